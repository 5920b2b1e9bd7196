"""The server's security options against real servers (tiny model, 127.0.0.1, real HTTP): the bearer
token, sessions bound to their own key, avatar upload checks (bytes, type, pixels before decoding),
CORS, per-address rate limits and /metrics on its own port. Plus the pieces without a server: the rate
limiter, the upload check and the `serve` command line."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib

import pytest

pytest.importorskip("aiortc")
aiohttp = pytest.importorskip("aiohttp")

from streaming.fixtures import ServerThread, offer_sdp  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402

TOKEN = "s3cret-token-for-tests"
ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from streaming.fixtures import responsive_checkpoint

    return responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


def _cfg(ckpt, **kw) -> ServeConfig:
    # admission=False: several sessions at once, which a busy machine's admission control could refuse
    return ServeConfig(checkpoint=ckpt, config="tiny", ice_hosts=("127.0.0.1",), max_sessions=4,
                       peer_timeout_s=2.0, max_upload_bytes=200_000, admission=False, **kw)


@pytest.fixture(scope="module")
def secure(ckpt):
    cfg = _cfg(ckpt, token=TOKEN, cors_origins=(ALLOWED,), max_upload_pixels=300 * 300, metrics_port=0)
    with ServerThread(cfg) as st:
        yield st


async def _http(method: str, url: str, token: str | None = None, **kw):
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers, **kw) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body), r.headers
            except ValueError:
                return r.status, body.decode(errors="replace"), r.headers


def http(method, url, token=None, **kw):
    return asyncio.run(_http(method, url, token, **kw))


def _png(size=(96, 96), colour=(200, 150, 120)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few hundred bytes of pixel data: decoding it would
    fail (truncated), so a 413 for it can only come from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4000)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------- token
def test_token_required_on_the_api_and_not_on_the_page(secure):
    sdp = offer_sdp()
    calls = [("GET", "/info", {}), ("POST", "/offer", {"json": {"sdp": sdp, "type": "offer"}}),
             ("GET", "/avatars", {}), ("POST", "/avatars", {"data": _png(), "headers": {"Content-Type": "image/png"}}),
             ("GET", "/sessions", {})]
    for method, path, kw in calls:
        st, body, h = http(method, secure.url + path, **kw)
        assert st == 401, (path, st, body)
        assert h["WWW-Authenticate"].startswith("Bearer") and "invalid_token" not in h["WWW-Authenticate"]
        assert "token" in body["error"]
        st, body, h = http(method, secure.url + path, token="not-" + TOKEN, **kw)
        assert st == 401 and 'error="invalid_token"' in h["WWW-Authenticate"], (path, st, body)
    st, body, _ = http("GET", secure.url + "/info", headers={"Authorization": "Basic " + TOKEN})
    assert st == 401  # only the Bearer scheme
    st, info, _ = http("GET", secure.url + "/info", token=TOKEN)
    assert st == 200 and info["image_size"] == 64
    st, page, h = http("GET", secure.url + "/")  # the page itself is public; it takes ?token= and sends it
    assert st == 200 and "Authorization" in page and "token" in page and h["Referrer-Policy"] == "no-referrer"
    st, health, _ = http("GET", secure.url + "/healthz")
    assert st == 200 and health["status"] == "ok"


def test_sessions_answer_only_to_their_own_key(secure):
    sdp = offer_sdp()
    st, a, _ = http("POST", secure.url + "/offer", token=TOKEN, json={"sdp": sdp, "type": "offer"})
    assert st == 200 and a["type"] == "answer", a
    st, b, _ = http("POST", secure.url + "/offer", token=TOKEN, json={"sdp": sdp, "type": "offer"})
    assert st == 200
    try:
        assert len(a["session"]) >= 22 and len(a["session_key"]) >= 43  # 128 and 256 random bits
        assert a["session"] != b["session"] and a["session_key"] != b["session_key"]
        ctl = f"{secure.url}/sessions/{a['session']}/controls"
        blink = {"json": {"type": "blink"}}
        for token in (None, TOKEN, b["session_key"]):  # no key, the server's token, another session's key
            for method, url, kw in [("POST", ctl, blink), ("GET", f"{secure.url}/sessions/{a['session']}", {}),
                                    ("GET", f"{secure.url}/sessions/{a['session']}/outputs", {}),
                                    ("DELETE", f"{secure.url}/sessions/{a['session']}", {})]:
                st, body, h = http(method, url, token=token, **kw)
                assert st == 401 and h["WWW-Authenticate"].startswith("Bearer"), (method, url, token, body)
        assert a["session"] in secure.server.sessions
        st, body, _ = http("POST", ctl, token=a["session_key"], **blink)
        assert st == 200 and body["applied"] == 1
        st, body, _ = http("GET", f"{secure.url}/sessions/{a['session']}", token=a["session_key"])
        assert st == 200 and body["session"] == a["session"]
        st, body, _ = http("POST", f"{secure.url}/sessions/nope/controls", token=a["session_key"], **blink)
        assert st == 404 and "unknown session" in body["error"]
        st, listing, _ = http("GET", secure.url + "/sessions", token=TOKEN)
        assert st == 200 and "session_key" not in json.dumps(listing)
    finally:
        for s in (a, b):
            st, body, _ = http("DELETE", f"{secure.url}/sessions/{s['session']}", token=s["session_key"])
            assert st == 200 and body["closed"]
    assert not secure.server.sessions and not secure.server._session_keys


# ------------------------------------------------------------------------------------------ uploads
def test_upload_checks_refuse_bombs_before_decoding_and_keep_what_is_stored(secure, monkeypatch):
    from PIL import ImageFile

    post = lambda data, ctype="image/png": http("POST", secure.url + "/avatars", token=TOKEN,  # noqa: E731
                                                data=data, headers={"Content-Type": ctype})
    st, kept, _ = post(_png())
    assert st == 201, kept
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))

    for w, h in [(8000, 8000), (100_000, 100_000), (301, 300)]:  # over our limit; over PIL's own; just over
        st, body, _ = post(_png_claiming(w, h))
        assert st == 413 and "pixels" in body["error"], (w, h, body)
    st, body, _ = post(_png((400, 400)))  # a real image over the limit
    assert st == 413 and "400x400" in body["error"]
    assert decoded == [], f"pixels were decoded for refused uploads: {decoded}"

    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00" \
          b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    for data, ctype in [(b"hello world", "image/png"), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
                        (gif, "image/gif"), (b"MZ\x90\x00" * 100, "application/octet-stream")]:
        st, body, _ = post(data, ctype)
        assert st == 415 and "PNG, JPEG or WebP" in body["error"], (data[:10], body)
    st, body, _ = post(b"x", "text/plain")
    assert st == 415
    st, body, _ = post(b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000)  # over max_upload_bytes
    assert st == 413 and "too large" in body["error"]
    st, body, _ = post(_png()[:40])  # a signature and half a header
    assert st == 400 and "malformed" in body["error"]
    st, body, _ = post(b"\x89PNG\r\n\x1a\n", "image/png")
    assert st == 400
    st, body, _ = post(b"--x\r\nbroken", "multipart/form-data; boundary=y")
    assert st == 400

    # a multipart file name never reaches the filesystem or the answer: the id is the content hash
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    form = aiohttp.FormData()
    png = _png(colour=(10, 200, 30))
    form.add_field("image", png, filename="../../../tmp/evil.png", content_type="image/png")
    st, body, _ = http("POST", secure.url + "/avatars", token=TOKEN, data=form)
    import hashlib

    assert st == 201 and body["id"] == hashlib.sha256(png).hexdigest()[:16] and "evil" not in json.dumps(body)
    st, listing, _ = http("GET", secure.url + "/avatars", token=TOKEN)
    ids = [x["id"] for x in listing["avatars"]]
    assert kept["id"] in ids and body["id"] in ids and "default" in ids  # nothing stored was lost


# --------------------------------------------------------------------------------------------- CORS
def test_cors_only_for_the_configured_origin(secure):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    st, _, h = http("OPTIONS", secure.url + "/offer", headers={"Origin": ALLOWED, **pre})
    assert st == 204 and h["Access-Control-Allow-Origin"] == ALLOWED
    assert "Authorization" in h["Access-Control-Allow-Headers"] and "POST" in h["Access-Control-Allow-Methods"]
    st, body, h = http("OPTIONS", secure.url + "/offer", headers={"Origin": "https://evil.example", **pre})
    assert st == 403 and "Access-Control-Allow-Origin" not in h and body["error"]

    st, _, h = http("GET", secure.url + "/info", token=TOKEN, headers={"Origin": ALLOWED})
    assert st == 200 and h["Access-Control-Allow-Origin"] == ALLOWED and "Origin" in h.get("Vary", "")
    st, _, h = http("GET", secure.url + "/info", token=TOKEN, headers={"Origin": "https://evil.example"})
    assert st == 200 and "Access-Control-Allow-Origin" not in h
    st, _, h = http("GET", secure.url + "/info", headers={"Origin": ALLOWED})  # errors readable cross-origin
    assert st == 401 and h["Access-Control-Allow-Origin"] == ALLOWED

    # a page elsewhere can POST a form without a preflight: refused, even with a valid token
    form = aiohttp.FormData()
    form.add_field("image", _png(colour=(1, 2, 3)), filename="x.png", content_type="image/png")
    st, body, h = http("POST", secure.url + "/avatars", token=TOKEN, data=form,
                       headers={"Origin": "https://evil.example"})
    assert st == 403 and "cross-origin" in body["error"]
    st, body, _ = http("POST", secure.url + "/avatars", token=TOKEN, data=_png(colour=(1, 2, 3)),
                       headers={"Content-Type": "image/png", "Origin": secure.url})  # the page's own origin
    assert st == 201, body


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_their_own_port_only(secure):
    port = secure.server.metrics_port
    assert port and port != secure.port
    st, text, h = http("GET", f"http://127.0.0.1:{port}/metrics")
    assert st == 200 and h["Content-Type"].startswith("text/plain") and "marionette_sessions " in text
    assert http("GET", f"http://127.0.0.1:{port}/info")[0] == 404  # that site serves /metrics alone
    assert http("GET", secure.url + "/metrics", token=TOKEN)[0] == 404  # and the main one no longer does


# ------------------------------------------------------------------------------------- rate limits
def test_rate_limits_answer_429_with_retry_after_and_no_cors_by_default(ckpt):
    cfg = _cfg(ckpt, offer_rate=(2, 60.0), upload_rate=(3, 60.0))
    with ServerThread(cfg) as st:
        for i in range(3):  # refused uploads count too: the limit is on requests
            assert http("POST", st.url + "/avatars", data=b"nope", headers={"Content-Type": "image/png"})[0] == 415
        code, body, h = http("POST", st.url + "/avatars", data=_png(), headers={"Content-Type": "image/png"})
        assert code == 429 and 1 <= int(h["Retry-After"]) <= 20 and "retry" in body["error"]
        bad = {"json": {"sdp": "hello", "type": "offer"}}
        assert [http("POST", st.url + "/offer", **bad)[0] for _ in range(2)] == [400, 400]
        code, body, h = http("POST", st.url + "/offer", **bad)
        assert code == 429 and 1 <= int(h["Retry-After"]) <= 30
        assert http("GET", st.url + "/info")[0] == 200  # other routes are not limited

        # no --cors-origin: same-origin only, no CORS headers at all
        pre = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST"}
        code, _, h = http("OPTIONS", st.url + "/offer", headers=pre)
        assert code == 403 and "Access-Control-Allow-Origin" not in h
        code, _, h = http("GET", st.url + "/info", headers={"Origin": ALLOWED})
        assert code == 200 and "Access-Control-Allow-Origin" not in h and "Vary" not in h


# ------------------------------------------------------------------------------- without a server
def test_rate_limiter_refills_groups_ipv6_and_stays_bounded():
    from streaming.server import RateLimiter

    now = [0.0]
    rl = RateLimiter(2, 60.0, max_clients=3, clock=lambda: now[0])
    assert rl.take("10.0.0.1") == 0 and rl.take("10.0.0.1") == 0
    assert rl.take("10.0.0.1") == pytest.approx(30.0)  # one token per 30 s
    assert rl.take("10.0.0.2") == 0  # another address has its own bucket
    now[0] = 30.0
    assert rl.take("10.0.0.1") == 0 and rl.take("10.0.0.1") > 0
    assert rl.take("2001:db8::1") == 0 and rl.take("2001:db8::ffff") == 0  # one /64: one bucket
    assert rl.take("2001:db8::2") > 0
    assert rl.take("::ffff:10.0.0.9") == 0 and rl.take("10.0.0.9") == 0  # v4-mapped is the v4 address
    assert rl.take("10.0.0.9") > 0
    for i in range(1000):
        rl.take(f"192.0.2.{i % 250}")
    assert len(rl) == 3


def test_check_upload_reads_only_the_header():
    from PIL import Image

    from streaming.avatars import UploadError, check_upload

    assert check_upload(_png((120, 80)), 10_000) == ("PNG", (120, 80))
    for fmt, name in (("JPEG", "JPEG"), ("WEBP", "WEBP")):
        buf = io.BytesIO()
        Image.new("RGB", (70, 90), (1, 2, 3)).save(buf, format=fmt)
        assert check_upload(buf.getvalue(), 10_000) == (name, (70, 90))
    with pytest.raises(UploadError) as e:
        check_upload(_png_claiming(50_000, 50_000), 10**12)  # past PIL's own bomb limit
    assert e.value.status == 413
    with pytest.raises(UploadError) as e:
        check_upload(_png((120, 80)), 9_599)
    assert e.value.status == 413
    with pytest.raises(UploadError) as e:
        check_upload(b"BM" + b"\0" * 100, 10_000)  # BMP: PIL reads it, but it is not accepted
    assert e.value.status == 415


def test_serve_command_line_wires_the_security_options(monkeypatch):
    import streaming.server
    from marionette.cli import main

    seen = []
    monkeypatch.setattr(streaming.server, "serve", seen.append)
    monkeypatch.setenv("MARIONETTE_TOKEN", "from-env")
    assert main(["serve", "--cors-origin", "https://a.example", "--cors-origin", "http://b.example:8081",
                 "--offer-rate", "5/s", "--upload-rate", "off", "--max-upload-mpix", "2",
                 "--metrics-port", "9100"]) == 0
    cfg = seen[-1]
    assert cfg.token == "from-env" and "from-env" not in repr(cfg)
    assert cfg.cors_origins == ("https://a.example", "http://b.example:8081")
    assert cfg.offer_rate == (5, 1.0) and cfg.upload_rate is None and cfg.max_upload_pixels == 2_000_000
    assert cfg.metrics_host == "127.0.0.1" and cfg.metrics_port == 9100
    assert main(["serve", "--token", "flag"]) == 0
    cfg = seen[-1]
    assert cfg.token == "flag" and cfg.offer_rate == (30, 60.0) and cfg.upload_rate == (10, 60.0)
    assert cfg.metrics_port is None and cfg.cors_origins == ()
    monkeypatch.delenv("MARIONETTE_TOKEN")
    assert main(["serve"]) == 0 and seen[-1].token is None
    for bad in (["--offer-rate", "ten"], ["--offer-rate", "3/fortnight"], ["--metrics-host", "10.0.0.1"],
                ["--metrics-port", "70000"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", *bad])
        assert e.value.code == 2


def test_bad_security_settings_are_refused_before_loading_anything():
    from engine.errors import InputError
    from streaming.server import AvatarServer

    for kw in ({"cors_origins": ("example.com",)}, {"cors_origins": ("https://a.example/path",)},
               {"token": ""}, {"token": "two words"}, {"offer_rate": (0, 60.0)}, {"max_upload_pixels": 0}):
        with pytest.raises(InputError):
            AvatarServer(ServeConfig(**kw))


def test_the_python_client_streams_from_a_server_with_a_token(secure):
    """streaming.client.AvatarClient(token=...) is let in, streams, and holds its session's key."""
    from streaming.client import AvatarClient

    async def go():
        c = AvatarClient(secure.url, token=TOKEN)
        try:
            await c.connect()
            await c.wait_first_frame(20.0)
            return c.session, c.session_key
        finally:
            await c.close()

    async def refused():
        c = AvatarClient(secure.url, token="wrong")
        try:
            await c.connect(timeout=5.0)
        finally:
            await c.close()

    sid, key = asyncio.run(go())
    assert sid and key and len(key) >= 43
    with pytest.raises(RuntimeError, match="401"):
        asyncio.run(refused())
