"""farm.toml loading: every table and type maps onto FarmConfig, and mistakes name their key."""

import dataclasses
import re
from pathlib import Path

import pytest

from renderfarm.cluster.config import FarmConfig, LimitsConfig, PoolConfig, RetryConfig
from renderfarm.cluster.config_file import ConfigError, load_config
from renderfarm.cluster.keys import load_users, token_sha256

REQUIRED = """
output_dir = "/srv/renderfarm/output"
model_cache_dir = "/srv/renderfarm/models"
state_dir = "/srv/renderfarm/state"
"""

DIRECTORIES = {
    "output_dir": Path("/srv/renderfarm/output"),
    "model_cache_dir": Path("/srv/renderfarm/models"),
    "state_dir": Path("/srv/renderfarm/state"),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(text)
    return path


FULL = REQUIRED + """
host = "0.0.0.0"
port = 50051
ray_address = "renderfarm-ray-head-svc:6379"
max_batch = 4
tiled_decode_above_pixels = 2_000_000
decode_tile = 256

[encoders]
replicas = 1
num_gpus = 0.1

[denoisers]
replicas = 4
num_gpus = 0.5
num_cpus = 1
dtype = "bfloat16"
channels_last = true
compile = "max-autotune"

[decoders]
replicas = 2
num_gpus = 0.2
dtype = "float32"
compile = "reduce-overhead"

[limits]
max_steps = 150
max_concurrent_jobs = 8

[retries]
max_attempts = 2
backoff_s = 1
"""


def test_a_full_file_loads_into_the_dataclasses(tmp_path):
    config = load_config(write(tmp_path, FULL))
    assert config == FarmConfig(
        **DIRECTORIES,
        host="0.0.0.0",
        port=50051,
        ray_address="renderfarm-ray-head-svc:6379",
        max_batch=4,
        tiled_decode_above_pixels=2_000_000,
        decode_tile=256,
        encoders=PoolConfig(replicas=1, num_gpus=0.1),
        denoisers=PoolConfig(
            replicas=4, num_gpus=0.5, num_cpus=1.0, dtype="bfloat16", channels_last=True, compile="max-autotune"
        ),
        decoders=PoolConfig(replicas=2, num_gpus=0.2, dtype="float32", compile="reduce-overhead"),
        limits=LimitsConfig(max_steps=150, max_concurrent_jobs=8),
        retries=RetryConfig(max_attempts=2, backoff_s=1.0),
    )
    assert isinstance(config.output_dir, Path) and isinstance(config.retries.backoff_s, float)


def test_only_the_required_keys_leave_everything_else_at_its_default(tmp_path):
    config = load_config(write(tmp_path, REQUIRED))
    assert config == FarmConfig(**DIRECTORIES)
    assert config.ray_address is None  # left out: start a local Ray


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[denoisers]\nreplicas = "two"', 'farm.toml: denoisers.replicas must be an integer (got "two")'),
        ("[denoisers]\nreplicas = true", "farm.toml: denoisers.replicas must be an integer (got true)"),
        ("[denoisers]\nreplicas = 2.5", "farm.toml: denoisers.replicas must be an integer (got 2.5)"),
        ('[encoders]\nnum_gpus = "0.5"', 'farm.toml: encoders.num_gpus must be a number (got "0.5")'),
        ('port = "50051"', 'farm.toml: port must be an integer (got "50051")'),
        ("ray_address = 6379", "farm.toml: ray_address must be a string (got 6379)"),
        ("denoisers = 2", "farm.toml: denoisers must be a table ([denoisers]), got 2"),
        ("[denoisers]\ndtype = 16", "farm.toml: denoisers.dtype must be a string (got 16)"),
        ("[decoders]\nchannels_last = 1", "farm.toml: decoders.channels_last must be true or false (got 1)"),
        ("[denoisers]\ncompile = true", "farm.toml: denoisers.compile must be a string (got true)"),
    ],
)
def test_a_wrong_type_names_the_key_and_the_value(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, REQUIRED + text))
    assert str(caught.value) == message


def test_a_path_must_be_a_string(tmp_path):
    with pytest.raises(ConfigError, match=r"farm\.toml: state_dir must be a path \(a string\) \(got 3\)"):
        load_config(write(tmp_path, 'output_dir = "/o"\nmodel_cache_dir = "/m"\nstate_dir = 3'))


@pytest.mark.parametrize(
    ("text", "key"),
    [("max_batchs = 4", "max_batchs"), ("[denoisers]\nreplica = 2", "denoisers.replica"),
     ("[limits]\nmax_step = 2", "limits.max_step"), ("[upscaler]\nreplicas = 1", "upscaler")],
)  # fmt: skip
def test_an_unknown_key_is_refused_by_its_full_name(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"^farm\.toml: unknown key {key} \(known: "):
        load_config(write(tmp_path, REQUIRED + text))


@pytest.mark.parametrize("missing", ["model_cache_dir", "state_dir"])
def test_each_directory_is_required(tmp_path, missing):
    text = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith(missing))
    with pytest.raises(ConfigError, match=rf"^farm\.toml: missing required key {missing}$"):
        load_config(write(tmp_path, text))


def test_results_go_to_a_directory_or_a_bucket_exactly(tmp_path):
    without_output = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith("output_dir"))
    config = load_config(write(tmp_path, without_output + '\noutput = "s3://renders/team-a"\n'))
    assert config.output == "s3://renders/team-a" and config.output_dir is None
    for text in (without_output, REQUIRED + 'output = "s3://renders"\n'):
        with pytest.raises(ConfigError, match=r"output_dir or output \(s3://BUCKET/PREFIX\): give exactly one"):
            load_config(write(tmp_path, text))
    for bad in ("/srv/out", "s3://", "s3:///prefix"):
        with pytest.raises(ConfigError, match=r"output must be s3://BUCKET or s3://BUCKET/PREFIX"):
            load_config(write(tmp_path, without_output + f'\noutput = "{bad}"\n'))


def test_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^farm\.toml: not valid TOML: "):
        load_config(write(tmp_path, REQUIRED + "[denoisers\n"))


def readme_toml(containing: str) -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL) if containing in block]
    return example


def test_the_readmes_example_loads(tmp_path):
    config = load_config(write(tmp_path, readme_toml("output_dir")))
    assert config.denoisers == PoolConfig(
        replicas=4, num_gpus=0.5, num_cpus=1.0, dtype="bfloat16", channels_last=True, compile="reduce-overhead"
    )
    assert config.ray_address == "farm-renderfarm-ray-head-svc:6379"
    assert config.auth.keys_file == Path("/etc/renderfarm/keys.toml") and config.health_port == 50052


def test_the_readmes_keys_file_entry_loads(tmp_path):
    (user,) = load_users(write(tmp_path, readme_toml("[[users]]")))
    assert (user.name, user.role, user.weight, user.max_concurrent_jobs) == ("alice", "member", 3.0, 4)
    assert user.token_sha256 == token_sha256("rf_example-token")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch = 0", "max_batch must be at least 1 (got 0)"),
        ("port = 70000", "port must be in 1-65535, or 0 for a free port (got 70000)"),
        ("port = -1", "port must be in 1-65535, or 0 for a free port (got -1)"),
        ("tiled_decode_above_pixels = 0", "tiled_decode_above_pixels must be at least 1 (got 0)"),
        ("decode_tile = -8", "decode_tile must be at least 1 (got -8)"),
        ("upscale_tile = 0", "upscale_tile must be at least 1 (got 0)"),
        ("[denoisers]\nreplicas = 0", "denoisers.replicas must be at least 1 (got 0)"),
        ("[upscalers]\nreplicas = -2", "upscalers.replicas must be at least 1 (got -2)"),
        ("[encoders]\nnum_gpus = -0.5", "encoders.num_gpus must be at least 0 (got -0.5)"),
        ("[encoders]\nnum_gpus = nan", "encoders.num_gpus must be at least 0 (got nan)"),
        ("[decoders]\nnum_cpus = -1", "decoders.num_cpus must be at least 0 (got -1.0)"),
        ('[decoders]\ndtype = "half"', "decoders.dtype must be one of float16, bfloat16, float32 (got 'half')"),
        ('[denoisers]\ncompile = "max"', "denoisers.compile must be one of default, reduce-overhead, max-autotune (got 'max')"),
        ('[encoders]\ncompile = "default"', "encoders.compile is not an option: it acts on UNets and VAEs, and the text encoders have neither"),
        ('[upscalers]\ncompile = "default"', "upscalers.compile is not an option: an upscale's UNet windows meet on threads at every GroupNorm, which torch.compile cannot trace"),
        ("[limits]\nmax_steps = 0", "limits.max_steps must be at least 1 (got 0)"),
        ("[limits]\nmax_concurrent_jobs = -1", "limits.max_concurrent_jobs must be at least 1 (got -1)"),
        ("[limits]\nmax_request_bytes = 1000", "limits.max_request_bytes must be at least max_source_bytes + 1048576, 68157440 (got 1000)"),
        ("[retries]\nmax_attempts = 0", "retries.max_attempts must be at least 1 (got 0)"),
        ("[retries]\nbackoff_s = -1", "retries.backoff_s must be at least 0 (got -1.0)"),
        ("[retries]\nbackoff_s = 2\nmax_backoff_s = 1.5", "retries.max_backoff_s must be at least backoff_s, 2.0 (got 1.5)"),
    ],
)  # fmt: skip
def test_a_value_out_of_range_names_the_key_and_the_value(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, REQUIRED + text))
    assert str(caught.value) == f"farm.toml: {message}"


@pytest.mark.parametrize("key", [field.name for field in dataclasses.fields(LimitsConfig)])
def test_every_limit_must_be_positive(tmp_path, key):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, REQUIRED + f"[limits]\n{key} = 0"))
    assert str(caught.value) == f"farm.toml: limits.{key} must be at least 1 (got 0)"


def test_the_edges_of_each_range_load(tmp_path):
    text = REQUIRED + """
port = 0
max_batch = 1
decode_tile = 1
[denoisers]
replicas = 1
num_gpus = 0
num_cpus = 0
[retries]
max_attempts = 1
backoff_s = 0
max_backoff_s = 0
"""
    config = load_config(write(tmp_path, text))
    assert (config.port, config.retries) == (0, RetryConfig(max_attempts=1, backoff_s=0.0, max_backoff_s=0.0))
    assert load_config(write(tmp_path, REQUIRED + "port = 65535")).port == 65535
