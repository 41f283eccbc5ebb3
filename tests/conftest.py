import pytest


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """One builtin-model cache for the whole run, so tiny-sd is built once."""
    return tmp_path_factory.mktemp("models")
