"""Scorer plugins: the example package under examples/format-scorer is pip-installed into a
temporary directory (never the shared environment), found through its `flywheel.scorers` entry
point by `flywheel serve reward`, configured from FLYWHEEL_REWARD_PLUGIN_*, and served end to end
alone and in an ensemble with a built-in scorer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import REPO, free_port
from waiting import wait_until_async

from flywheel.reward.scorers import VaderScorer, create_plugin, load_plugin

PLUGIN = REPO / "examples" / "format-scorer"


def install_command(target: Path) -> list[str]:
    """pip if this interpreter has it, else uv (what `make env` uses); offline, no build isolation."""
    if importlib.util.find_spec("pip"):
        return [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(target)]
    uv = shutil.which("uv") or next((str(p) for p in (Path.home() / ".cache" / "flywheel").glob("uv-*/bin/uv")), None)
    if uv is None:
        pytest.skip("neither pip nor uv is available to install the example plugin")
    return [uv, "pip", "install", "--no-deps", "--no-build-isolation", "--python", sys.executable,
            "--target", str(target)]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src") / "format-scorer"
    shutil.copytree(PLUGIN, build)  # builds write egg-info next to the sources; keep the repo clean
    out = subprocess.run([*install_command(target), str(build)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert list(target.glob("flywheel_format_scorer-*.dist-info/entry_points.txt"))
    return target


def test_plugin_settings_come_from_the_environment_and_the_config_file(plugin_path, monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.setenv("FLYWHEEL_REWARD_PLUGIN_MIN_WORDS", "1")
    monkeypatch.setenv("FLYWHEEL_REWARD_PLUGIN_MAX_WORDS", "3")
    scorer = create_plugin(load_plugin("format"))  # by entry-point name
    assert scorer.name == "format" and scorer.settings.max_words == 3
    assert scorer.score(["", ""], ["Short one.", "far too many words here"]) == [1.0, pytest.approx(1 / 6)]
    config = tmp_path / "plugin.toml"
    config.write_text('max_words = 10\nrequired_regex = "thanks"\n')
    from flywheel.reward.scorers.factory import read_plugin_config

    scorer = create_plugin(load_plugin("flywheel_format_scorer:FormatScorer"), read_plugin_config(config))
    assert scorer.settings.max_words == 10 and scorer.settings.min_words == 1  # file wins, env fills the rest
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*format"):
        load_plugin("nope")


async def test_installed_plugin_is_served_alone_and_in_an_ensemble(plugin_path, tmp_path) -> None:
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
           "FLYWHEEL_HOST": "127.0.0.1", "FLYWHEEL_GRPC_PORT": str(grpc_port), "FLYWHEEL_METRICS_PORT": "0",
           "FLYWHEEL_REWARD_HTTP_PORT": str(http_port), "FLYWHEEL_HOME": str(tmp_path / "home"),
           "FLYWHEEL_REWARD_WORKER_ENABLED": "false", "FLYWHEEL_REWARD_RELOAD_ENABLED": "false",
           "FLYWHEEL_SHUTDOWN_DELAY_S": "0", "FLYWHEEL_REWARD_SCORER": "ensemble",
           "FLYWHEEL_REWARD_ENSEMBLE": "format=1,vader=0.5",
           "FLYWHEEL_REWARD_PLUGIN_MIN_WORDS": "2", "FLYWHEEL_REWARD_PLUGIN_MAX_WORDS": "6"}
    log = tmp_path / "reward.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "reward"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    async with http.get(f"{url}/v2/health/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until_async(ready, timeout_s=120, what="the reward service serving the plugin")
            responses = ["I love this, thank you!", "no"]
            async with http.post(f"{url}/get_reward", json={"query": responses}) as r:
                reply = await r.json()
            async with http.get(f"{url}/v2/models/reward") as r:
                meta = await r.json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    vader = VaderScorer().score(["", ""], responses)
    fmt = [1.0, 0.25]  # in range and ends a sentence; one word short and no sentence end: (0.5 + 0) / 2
    assert reply["rewards"] == pytest.approx([f + 0.5 * v for f, v in zip(fmt, vader)], abs=1e-6)
    assert reply["extra_logs"]["format_scores"] == pytest.approx(fmt)
    assert "format@0.1.0:2-6" in meta["versions"][0]
