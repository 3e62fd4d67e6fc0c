import sys
from pathlib import Path

import pytest
import torch

# Test modules share helpers by module name (`reference`, `from test_model import small`); the folders mirror the
# package, and basenames stay unique across them.
_HERE = Path(__file__).parent
sys.path[:0] = [str(_HERE), *(str(folder) for folder in sorted(_HERE.iterdir()) if folder.is_dir())]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second intra-op thread
    only adds synchronisation, and beside worker processes it oversubscribes the 2 cores (10× slower when busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
