"""FarmConfig and its tables refuse out-of-range values when built, naming the key as farm.toml spells it."""

import dataclasses
from pathlib import Path

import pytest

from renderfarm import cli
from renderfarm.cluster.config import ConfigValueError, FarmConfig, LimitsConfig, PoolConfig, RetryConfig
from renderfarm.cluster.constants import REQUEST_BYTES_BESIDES_SOURCES

DIRECTORIES = dict(output_dir=Path("out"), model_cache_dir=Path("models"), state_dir=Path("state"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PoolConfig(replicas=0), "replicas must be at least 1 (got 0)"),
        (lambda: PoolConfig(num_gpus=-0.25), "num_gpus must be at least 0 (got -0.25)"),
        (lambda: PoolConfig(num_cpus=-1), "num_cpus must be at least 0 (got -1)"),
        (lambda: PoolConfig(num_gpus=float("nan")), "num_gpus must be at least 0 (got nan)"),
        (lambda: PoolConfig(dtype="half"), "dtype must be one of float16, bfloat16, float32 (got 'half')"),
        (lambda: PoolConfig(dtype="fp16"), "dtype must be one of float16, bfloat16, float32 (got 'fp16')"),
        (lambda: PoolConfig(compile="fast"), "compile must be one of default, reduce-overhead, max-autotune (got 'fast')"),
        (lambda: FarmConfig(**DIRECTORIES, encoders=PoolConfig(compile="default")), "encoders.compile is not an option: it acts on UNets and VAEs, and the text encoders have neither"),
        (lambda: FarmConfig(**DIRECTORIES, encoders=PoolConfig(channels_last=True)), "encoders.channels_last is not an option: it acts on UNets and VAEs, and the text encoders have neither"),
        (lambda: FarmConfig(**DIRECTORIES, upscalers=PoolConfig(compile="default")), "upscalers.compile is not an option: an upscale's UNet windows meet on threads at every GroupNorm, which torch.compile cannot trace"),
        (lambda: LimitsConfig(max_side=0), "max_side must be at least 1 (got 0)"),
        (lambda: LimitsConfig(max_pixels=-1), "max_pixels must be at least 1 (got -1)"),
        # Raising max_source_bytes alone: the default request limit would refuse the images it allows.
        (lambda: LimitsConfig(max_source_bytes=100 * 2**20), "max_request_bytes must be at least max_source_bytes + 1048576, 105906176 (got 83886080)"),
        (lambda: LimitsConfig(max_source_bytes=2**20, max_request_bytes=2**20 - 1), "max_request_bytes must be at least max_source_bytes + 1048576, 2097152 (got 1048575)"),
        (lambda: RetryConfig(max_attempts=0), "max_attempts must be at least 1 (got 0)"),
        (lambda: RetryConfig(backoff_s=-0.1), "backoff_s must be at least 0 (got -0.1)"),
        (lambda: RetryConfig(backoff_s=5.0, max_backoff_s=1.0), "max_backoff_s must be at least backoff_s, 5.0 (got 1.0)"),
        (lambda: FarmConfig(**DIRECTORIES, max_batch=0), "max_batch must be at least 1 (got 0)"),
        (lambda: FarmConfig(**DIRECTORIES, port=65536), "port must be in 1-65535, or 0 for a free port (got 65536)"),
        (lambda: FarmConfig(**DIRECTORIES, port=-1), "port must be in 1-65535, or 0 for a free port (got -1)"),
        (lambda: FarmConfig(**DIRECTORIES, tiled_decode_above_pixels=0), "tiled_decode_above_pixels must be at least 1 (got 0)"),
        (lambda: FarmConfig(**DIRECTORIES, decode_tile=0), "decode_tile must be at least 1 (got 0)"),
        (lambda: FarmConfig(**DIRECTORIES, upscale_tile=-128), "upscale_tile must be at least 1 (got -128)"),
    ],
)  # fmt: skip
def test_each_dataclass_names_its_own_key(build, message):
    with pytest.raises(ConfigValueError) as caught:
        build()
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_a_key_is_prefixed_by_whoever_names_its_table():
    with pytest.raises(ConfigValueError) as caught:
        PoolConfig(replicas=0)
    named = caught.value.under("denoisers.")
    assert (str(named), named.key, named.problem) == (
        "denoisers.replicas must be at least 1 (got 0)", "denoisers.replicas", "must be at least 1 (got 0)"
    )  # fmt: skip


def test_replace_checks_too():
    config = FarmConfig(**DIRECTORIES, port=0)  # 0: a free port, as the tests use
    with pytest.raises(ConfigValueError, match=r"^max_batch must be at least 1 \(got 0\)$"):
        dataclasses.replace(config, max_batch=0)
    with pytest.raises(ConfigValueError, match=r"^max_attempts must be at least 1 \(got 0\)$"):
        dataclasses.replace(config.retries, max_attempts=0)


def test_the_defaults_and_the_edges_are_accepted():
    FarmConfig(**DIRECTORIES)
    FarmConfig(**DIRECTORIES, port=65535, max_batch=1, decode_tile=1, upscale_tile=1, tiled_decode_above_pixels=1)
    PoolConfig(replicas=1, num_gpus=0.0, num_cpus=0.0)
    for dtype in ("float16", "bfloat16", "float32"):
        assert PoolConfig(dtype=dtype).dtype == dtype
    for mode in ("default", "reduce-overhead", "max-autotune"):
        FarmConfig(**DIRECTORIES, denoisers=PoolConfig(compile=mode), decoders=PoolConfig(compile=mode))
    FarmConfig(**DIRECTORIES, encoders=PoolConfig(dtype="float32"), upscalers=PoolConfig(channels_last=True))
    RetryConfig(max_attempts=1, backoff_s=0.0, max_backoff_s=0.0)
    LimitsConfig(**{field.name: 1 for field in dataclasses.fields(LimitsConfig)}
                 | {"max_request_bytes": 1 + REQUEST_BYTES_BESIDES_SOURCES})  # fmt: skip


@pytest.fixture
def no_serving(monkeypatch):
    """A refused config must stop the command before any farm (or Ray) starts."""

    def serve(config):
        raise AssertionError(f"a farm was started with {config}")

    monkeypatch.setattr(cli, "_serve", serve)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--denoisers", "0"], "denoisers.replicas must be at least 1 (got 0)"),
        (["--upscalers", "-1"], "upscalers.replicas must be at least 1 (got -1)"),
        (["--max-batch", "0"], "max_batch must be at least 1 (got 0)"),
        (["--gpus-per-replica", "-1"], "encoders.num_gpus must be at least 0 (got -1.0)"),
        (["--port", "70000"], "port must be in 1-65535, or 0 for a free port (got 70000)"),
    ],
)
def test_up_refuses_a_bad_value_in_one_line(tmp_path, capsys, no_serving, argv, message):
    assert cli.main(["up", "--state-dir", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err == f"renderfarm: {message}\n"


def test_serve_refuses_a_bad_value_by_its_farm_toml_key(tmp_path, capsys, no_serving):
    config = tmp_path / "farm.toml"
    config.write_text('output_dir = "o"\nmodel_cache_dir = "m"\nstate_dir = "s"\n[retries]\nmax_attempts = 0\n')
    assert cli.main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "renderfarm: farm.toml: retries.max_attempts must be at least 1 (got 0)\n"
