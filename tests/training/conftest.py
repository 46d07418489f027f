import pytest

from training.data.synthetic import synthesize


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic H&E dataset shared by the training and export tests."""
    out = tmp_path_factory.mktemp("synth") / "tiles"
    synthesize(out, classes=3, per_class=8, size=64, seed=1)
    return out
