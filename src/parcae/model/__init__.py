"""Model components: layers, injections, the loop and the Parcae model."""
