"""`serve --latency low|balanced|safe`: the levels move the audio margin and the scheduler lead together,
so the pipeline latency the server announces (and its sessions use) orders low < balanced < safe."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("aiortc")

from engine.errors import InputError  # noqa: E402
from streaming.fixtures import ServerThread, responsive_checkpoint  # noqa: E402
from streaming.server import LATENCY_LEVELS, ServeConfig  # noqa: E402


def _info(url: str) -> dict:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/info") as r:
                return json.loads(await r.read())

    return asyncio.run(go())


def test_latency_levels_order_the_pipeline_latency(tmp_path):
    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    got = {}
    for level in ("low", "balanced", "safe"):
        cfg = ServeConfig(checkpoint=ck, config="tiny", ice_hosts=("127.0.0.1",), latency=level)
        with ServerThread(cfg) as st:
            info = _info(st.url)
            lead, round_s = st.server.lead_s, st.server.warmup_times[1]
        lv = LATENCY_LEVELS[level]
        assert info["latency_level"] == level and info["audio_margin_ms"] == lv.audio_margin_ms
        assert info["lip_lag_ms"] == lv.lip_lag_ms
        # the announced latency is the sum of its terms (the lip lag taken off the half frame)
        mc = st.server.pipeline.cfg
        want_ms = 1000 * (0.02 - lv.lip_lag_ms / 1000 + mc.lookahead_ms / 1000
                          + mc.audio.right_overhang / mc.audio.sample_rate + lv.audio_margin_ms / 1000 + lead)
        assert info["latency_ms"] == pytest.approx(want_ms, abs=0.06)
        # the lead follows the level's rule from this server's own measured round time
        want = min(lv.lead_max_periods * 0.04, max(lv.lead_min_ms / 1000, lv.lead_factor * round_s + lv.lead_add_ms / 1000))
        assert lead == pytest.approx(want)
        got[level] = info["latency_ms"]
    # a margin each level adds on its own (the measured rounds differ between servers, the margins do not)
    assert got["low"] < got["balanced"] < got["safe"], got
    assert got["safe"] - got["low"] >= LATENCY_LEVELS["safe"].audio_margin_ms - LATENCY_LEVELS["low"].audio_margin_ms


def test_low_is_the_default_and_the_lip_lag_is_bounded(tmp_path):
    assert ServeConfig().latency == "low" and LATENCY_LEVELS["low"].lip_lag_ms == 20.0
    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    with pytest.raises(InputError, match="--lip-lag-ms 30: must be between 0 and half a frame period"):
        with ServerThread(ServeConfig(checkpoint=ck, config="tiny", lip_lag_ms=30.0)):
            pass


def test_unknown_latency_level_is_refused(tmp_path):
    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    with pytest.raises(InputError, match="--latency 'fast'"):
        with ServerThread(ServeConfig(checkpoint=ck, config="tiny", latency="fast")):
            pass
