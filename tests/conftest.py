from pathlib import Path

import pytest

# Each test's cost tier, by the directory it is in: `pytest -m unit` runs in seconds.
TIERS = {"unit": "unit", "chart": "unit", "integration": "integration"}
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            directory = item.path.relative_to(TESTS).parts[0]
        except ValueError:  # a test outside tests/ (none today)
            continue
        if directory in TIERS:
            item.add_marker(TIERS[directory])


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """One builtin-model cache for the whole run, so tiny-sd is built once."""
    return tmp_path_factory.mktemp("models")
