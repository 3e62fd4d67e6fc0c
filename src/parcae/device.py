"""Device resolution shared by every command (the base floor: imports nothing of the package)."""

import torch


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch device for `--device`; under torchrun (`local_rank` given) CUDA means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists two dozen backends; say what this tool runs on
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA devices.")
    if local_rank is not None and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"under torchrun use --device cuda (each rank takes cuda:LOCAL_RANK), not {name!r}.")
        device = torch.device("cuda", local_rank)
    return device
