"""Face detectors/landmarkers for real photos, compared; and the per-frame cost of paste-back.

Candidates (all install from PyPI and read their models from the installed package, nothing downloaded):
  dlib       dlib-bin's HOG frontal face detector + the 68-point shape predictor of face_recognition_models
             (eye centre = mean of the eye's 6 contour points), engine.face.DlibDetector: the default
  opencv     OpenCV 4's shipped Haar cascades (frontal face, then eyes inside it; no mouth, no pose),
             engine.face.OpenCVDetector (`opencv-python-headless<5`)
  mediapipe  mediapipe 0.10.21's Face Mesh (478 landmarks with irises; models inside its wheel). It pins
             numpy 1.x and protobuf 4, which conflict with onnx here, so it runs in a separate venv:
             `python -m venv /tmp/mpvenv && /tmp/mpvenv/bin/pip install mediapipe==0.10.21`, then
             `--mediapipe-python /tmp/mpvenv/bin/python` (this script runs itself there as a worker
             that imports only numpy, PIL and mediapipe)

Measured per candidate:
  install weight   installed bytes of the packages it needs beyond this project's other dependencies
  speed            median wall ms per detection (+ landmarks) on 512x512 images, one thread, with the
                   load average beside it (the machine may be shared)
  real photos      matplotlib's grace_hopper.jpg and scikit-image's astronaut.png and transformed variants
                   of them (rotated, scaled, off-centre, grey, small face in a large canvas, mirror): found,
                   and the eye-centre error (px) against pupil centres read by hand off 24x magnified crops
                   (carried through each variant's known geometry)
  corpus frames    renders of the synthetic corpus (trainer.corpus.face) at 512x512, fresh identities, pose
                   drawn from the corpus ranges, eyes open and centred: found, and the eye-centre error
                   against the renderer's own eye centres (projected from head space); for dlib also the
                   yaw estimate's error against the rendered yaw

And the per-frame cost of engine.face.Compositor.paste (warp the 256x256 crop, colour-match, feathered
blend) at 512x512 around the face and at the photo's own size (512x600 and a 1920x1080 photo).

    python benchmarks/face_detectors.py [--mediapipe-python /tmp/mpvenv/bin/python] [--synthetic 40]

Writes benchmarks/results/face_detectors.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
# pupil centres read by hand (pixel centres): image-left eye, image-right eye (as tests/test_face.py)
REF_EYES = {"grace": [[223.8, 190.0], [304.5, 187.5]], "astro": [[202.5, 101.0], [246.0, 103.0]]}


# =================================================================================== mediapipe worker
def _mediapipe_worker(npz: str, out: str) -> None:
    """Runs under the mediapipe venv: numpy 1.x, PIL and mediapipe only (no project imports)."""
    import importlib.metadata as md

    import mediapipe as mp

    data = np.load(npz)
    fm = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=4, refine_landmarks=True,
                                         min_detection_confidence=0.5)
    res = {}
    for key in data.files:
        img = np.ascontiguousarray(data[key])
        h, w = img.shape[:2]
        fm.process(img)  # warm (static mode: every call detects)
        times, cpu = [], []
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            r = fm.process(img)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        faces = []
        for f in (r.multi_face_landmarks or []):
            lm = np.array([(p.x * w - 0.5, p.y * h - 0.5) for p in f.landmark])
            eyes = lm[[468, 473]]
            eyes = eyes[np.argsort(eyes[:, 0])]
            xs, ys = lm[:, 0], lm[:, 1]
            faces.append({"eyes": eyes.tolist(), "mouth": lm[[13, 14, 61, 291]].mean(0).tolist(),
                          "box": [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]})
        faces.sort(key=lambda f: -(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
        res[key] = {"ms": float(np.median(times) * 1000), "cpu_ms": float(np.median(cpu) * 1000), "faces": faces}
    # install weight: mediapipe and everything it requires (recursively) in this venv
    seen, todo, total = set(), ["mediapipe"], 0
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        total += sum((f.size or 0) for f in (d.files or []))
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            n = req.split(";")[0].strip()
            for sep in "<>=!~ [(":
                n = n.split(sep)[0]
            todo.append(n)
    json.dump({"results": res, "install_bytes": total, "packages": sorted(seen), "version": mp.__version__,
               "numpy": np.__version__}, open(out, "w"))


# ======================================================================================== the images
def _real_images():
    """{name: (image, reference eyes (2,2) or None)} for the real photographs and their variants."""
    sys.path.insert(0, str(ROOT))
    import matplotlib
    import skimage.data

    from engine import face as F

    def sim(angle, scale, cin, cout):
        a = math.radians(angle)
        A = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        return np.concatenate([A, (np.asarray(cout, float) - A @ np.asarray(cin, float))[:, None]], 1)

    photos = {"grace": F.load_photo(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"),
              "astro": F.load_photo(Path(skimage.data.__file__).parent / "astronaut.png")}
    out = {}
    for name, photo in photos.items():
        eyes = np.asarray(REF_EYES[name])
        h, w = photo.shape[:2]
        c = ((w - 1) / 2, (h - 1) / 2)
        out[f"{name}"] = (photo, eyes)
        g = (photo.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5).astype(np.uint8)
        out[f"{name}-grey"] = (np.repeat(g[..., None], 3, 2), eyes)
        m = eyes.copy()
        m[:, 0] = w - 1 - m[:, 0]
        out[f"{name}-mirror"] = (np.ascontiguousarray(photo[:, ::-1]), m[::-1])
        for kind, (size, M) in {
            "rotated20": ((w + 160, h + 160), sim(20.0, 1.0, c, ((w + 159) / 2, (h + 159) / 2))),
            "rotated-25": ((w + 160, h + 160), sim(-25.0, 1.0, c, ((w + 159) / 2, (h + 159) / 2))),
            "scaled0.6": ((int(w * 0.6), int(h * 0.6)), sim(0.0, 0.6, c, ((w * 0.6 - 1) / 2, (h * 0.6 - 1) / 2))),
            "off-centre": ((w + 500, h + 300), sim(0.0, 1.0, c, (w + 300, h / 2 + 250))),
            "small-in-large": ((1400, 1100), sim(0.0, 0.7, c, (1000, 300))),
        }.items():
            img = F.warp_affine(photo, F._invert(M), size[0], size[1], resample="bicubic", fill=(90, 110, 100))
            out[f"{name}-{kind}"] = (img, eyes @ M[:, :2].T + M[:, 2])
    # 512x512 versions for the timing (grace is 512x600: its top 512 rows hold the face)
    timing = {"astro-512": photos["astro"], "grace-512": np.ascontiguousarray(photos["grace"][44:556])}
    return out, timing, photos


def _corpus_frames(n: int, size: int = 512, seed: int = 0):
    """n corpus renders with known eye centres (pixel centres) and yaw."""
    import torch

    from trainer.corpus import face as R
    from trainer.corpus.face import FaceRenderer, sample_identity

    rng = np.random.default_rng(seed)
    ids = np.stack([sample_identity(rng) for _ in range(n)]).astype(np.float32)
    lo = np.array([-35.0, -22.0, -16.0, -0.08, -0.08, 0.9])
    hi = np.array([35.0, 22.0, 16.0, 0.08, 0.08, 1.1])
    pose = (lo + (hi - lo) * rng.random((n, 6))).astype(np.float32)
    rend = FaceRenderer(size)
    imgs = []
    for s in range(0, n, 8):
        x = rend.render(ids[s:s + 8], pose[s:s + 8])
        imgs.append(np.ascontiguousarray((x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)))
    imgs = np.concatenate(imgs)
    p = R._derive(torch.from_numpy(ids), torch.from_numpy(pose))
    es, ey = p["f"]("eye_spacing").view(-1), p["f"]("eye_y").view(-1)
    a1, b1, c1 = p["a1"].view(-1), p["b1"].view(-1), p["c1"].view(-1)
    ze = c1 * (1 - (es / a1) ** 2 - (ey / b1) ** 2).sqrt()
    pts = torch.stack([torch.stack([-es, ey, ze], -1), torch.stack([es, ey, ze], -1)], 1)
    world = p["centre"].view(-1, 1, 3) + p["scale"].view(-1, 1, 1) * torch.einsum("bij,bkj->bki", p["R"], pts)
    col, row = R._project_points(world, size)
    eyes = torch.stack([col, row], -1).numpy()  # (n, 2, 2) head's -x eye first: image-left at small yaw
    eyes = np.stack([e[np.argsort(e[:, 0])] for e in eyes])
    return imgs, eyes, pose


# ========================================================================================= measuring
def _eye_error(found_eyes, ref) -> float:
    return float(np.mean(np.hypot(*(np.asarray(found_eyes) - np.asarray(ref)).T)))


def _pick(faces, ref):
    """The detected face whose eyes are nearest the reference (a photo may hold a false detection)."""
    if not faces:
        return None
    return min(faces, key=lambda f: _eye_error(f["eyes"], ref))


def _run_engine_detector(name: str, images: dict, repeats: int = 3):
    from engine import face as F

    t = time.perf_counter()
    det = F.get_detector(name)
    load_s = time.perf_counter() - t
    res = {}
    for key, img in images.items():
        det.detect(img)
        times, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            faces = det.detect(img)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        res[key] = {"ms": float(np.median(times) * 1000), "cpu_ms": float(np.median(cpu) * 1000), "faces": [
            {"eyes": f.eyes.tolist(), "mouth": None if f.mouth is None else f.mouth.tolist(), "box": list(f.box),
             "pose": f.pose} for f in faces]}
    return res, load_s


def _dist_bytes(names) -> int:
    import importlib.metadata as md

    total = 0
    for n in names:
        try:
            d = md.distribution(n)
        except md.PackageNotFoundError:
            return -1
        total += sum((f.size or 0) for f in (d.files or []))
    return total


def _paste_cost(photos, repeats: int = 30):
    import torch  # noqa: F401  (engine imports it anyway)

    from engine import face as F

    astro = photos["astro"]
    big = np.full((1080, 1920, 3), 100, np.uint8)
    big[200:712, 700:1212] = astro
    big = F.warp_affine(astro, F._invert(np.array([[2.0, 0, 500], [0, 2.0, 20]])), 1920, 1080, resample="bicubic")
    cases = {"grace 512x600 photo, output 512x512 around the face": (photos["grace"], "512"),
             "grace 512x600 photo, output original (512x600)": (photos["grace"], "original"),
             "1920x1080 photo, output 512x512 around the face": (big, "512"),
             "1920x1080 photo, output original (1920x1080)": (big, "original")}
    rng = np.random.default_rng(0)
    out = {}
    for label, (photo, spec) in cases.items():
        crop, tf = F.align(photo)
        t = time.perf_counter()
        comp = F.Compositor(photo, tf, spec, source_crop=crop)
        setup_ms = (time.perf_counter() - t) * 1000
        frames = [np.clip(crop.astype(np.int16) + rng.integers(-8, 8, crop.shape), 0, 255).astype(np.uint8)
                  for _ in range(4)]
        comp.paste(frames[0])
        times, cpu = [], []
        for i in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            comp.paste(frames[i % 4])
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[label] = {"output": list(comp.size), "ms_median": round(float(np.median(times) * 1000), 2),
                      "cpu_ms_median": round(float(np.median(cpu) * 1000), 2),
                      "ms_p90": round(float(np.percentile(times, 90) * 1000), 2), "setup_ms": round(setup_ms, 1),
                      "face_scale": round(tf.scale, 3), "loadavg": os.getloadavg()}
    return out


def _model_ms() -> dict:
    try:
        d = json.loads((OUT / "backends.json").read_text())
        g = d["results"]["generate"]["batch_1"]
        return {k: v["ms_per_frame"] for k, v in g.items() if "ms_per_frame" in v}
    except (OSError, KeyError, ValueError):
        return {}


def _summarise(name: str, res: dict, real: dict, corpus_eyes, corpus_pose, install_bytes: int, timing_keys):
    rows = {}
    errs = []
    found = 0
    for key, (_, ref) in real.items():
        f = _pick(res[key]["faces"], ref)
        ok = f is not None and _eye_error(f["eyes"], ref) < 0.25 * float(np.hypot(*(ref[1] - ref[0])))
        found += ok
        e = _eye_error(f["eyes"], ref) if ok else None
        if ok:
            errs.append(e)
        rows[key] = {"found": bool(ok), "faces": len(res[key]["faces"]), "eye_err_px": None if e is None else round(e, 2)}
    c_found, c_errs, yaw_errs = 0, [], []
    for i, ref in enumerate(corpus_eyes):
        f = _pick(res[f"corpus{i}"]["faces"], ref)
        if f is None:
            continue
        e = _eye_error(f["eyes"], ref)
        if e < 0.25 * float(np.hypot(*(ref[1] - ref[0]))):
            c_found += 1
            c_errs.append(e)
            if f.get("pose"):
                yaw_errs.append(abs(f["pose"][0] - float(corpus_pose[i][0])))
    n_c = len(corpus_eyes)
    ms = [res[k]["ms"] for k in timing_keys]
    cpu = [res[k].get("cpu_ms", float("nan")) for k in timing_keys]
    return {
        "install_mb": round(install_bytes / 2 ** 20, 1) if install_bytes >= 0 else None,
        "ms_512_median": round(float(np.median(ms)), 1),
        "cpu_ms_512_median": round(float(np.median(cpu)), 1),
        "ms_512_each": {k: round(res[k]["ms"], 1) for k in timing_keys},
        "real": {"found": found, "of": len(real),
                 "eye_err_px_median": round(float(np.median(errs)), 2) if errs else None,
                 "eye_err_px_max": round(float(np.max(errs)), 2) if errs else None, "per_image": rows},
        "corpus": {"found": c_found, "of": n_c,
                   "eye_err_px_median": round(float(np.median(c_errs)), 2) if c_errs else None,
                   "eye_err_px_p90": round(float(np.percentile(c_errs, 90)), 2) if c_errs else None,
                   "yaw_err_deg_median": round(float(np.median(yaw_errs)), 1) if yaw_errs else None,
                   "yaw_err_deg_p90": round(float(np.percentile(yaw_errs, 90)), 1) if yaw_errs else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mediapipe-python", help="python of a venv with mediapipe==0.10.21 (isolated)")
    ap.add_argument("--synthetic", type=int, default=40, help="corpus frames (512x512)")
    ap.add_argument("--out", type=Path, default=OUT / "face_detectors.json")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _mediapipe_worker(*a.worker)
        return
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_start = os.getloadavg()
    real, timing, photos = _real_images()
    c_imgs, c_eyes, c_pose = _corpus_frames(a.synthetic)
    images = {k: v[0] for k, v in real.items()}
    images.update(timing)
    images.update({f"corpus{i}": im for i, im in enumerate(c_imgs)})
    timing_keys = list(timing) + [f"corpus{i}" for i in range(min(8, len(c_imgs)))]

    results, meta = {}, {}
    for name, dists in (("dlib", ["dlib-bin", "face_recognition_models"]), ("opencv", ["opencv-python-headless"])):
        try:
            res, load_s = _run_engine_detector(name, images)
        except Exception as e:  # noqa: BLE001 - a candidate that is not installed is reported, not fatal
            meta[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        results[name] = _summarise(name, res, real, c_eyes, c_pose, _dist_bytes(dists), timing_keys)
        results[name]["model_load_s"] = round(load_s, 2)
        results[name]["loadavg_after"] = os.getloadavg()
    if a.mediapipe_python:
        with tempfile.TemporaryDirectory() as td:
            npz, js = Path(td) / "imgs.npz", Path(td) / "mp.json"
            np.savez(npz, **images)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
            p = subprocess.run([a.mediapipe_python, __file__, "--worker", str(npz), str(js)], env=env,
                               capture_output=True, text=True)
            if p.returncode == 0:
                mp = json.loads(js.read_text())
                results["mediapipe"] = _summarise("mediapipe", mp["results"], real, c_eyes, c_pose,
                                                  mp["install_bytes"], timing_keys)
                results["mediapipe"].update({"version": mp["version"], "numpy": mp["numpy"],
                                             "packages": mp["packages"], "loadavg_after": os.getloadavg()})
            else:
                meta["mediapipe"] = {"error": p.stderr[-2000:]}
    paste = _paste_cost(photos)
    report = {
        "benchmark": "face_detectors",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "threads": 1},
        "command": "python benchmarks/face_detectors.py " + " ".join(sys.argv[1:]),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "images": {"real": len(real), "corpus": len(c_imgs), "timing": timing_keys},
        "default": "dlib",
        "candidates": results, "errors": meta,
        "paste_back": paste, "model_ms_per_frame_256_batch1": _model_ms(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    a.out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict) -> str:
    L = ["# Face detectors for real photos", "",
         f"`{r['command']}` on {r['machine']['cpu_count']} CPU cores, one thread, {r['time']}; load average "
         f"{r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end (a training job shared "
         "the machine: wall times are inflated; CPU ms, this process' CPU time per call, is the steadier figure; "
         "mediapipe's runs several threads of its own, so its CPU ms can exceed its wall ms).", "",
         f"Real photos: {r['images']['real']} (grace_hopper.jpg, astronaut.png and variants: grey, mirror, rotated "
         "+20 / -25 deg, scaled 0.6, off-centre, small face in a 1400x1100 canvas); eye error against pupil "
         "centres read by hand. Corpus: "
         f"{r['images']['corpus']} renders at 512x512, pose from the corpus ranges; eye error against the "
         "renderer's eye centres. Found = a face whose eyes are within a quarter of the interocular distance.", "",
         "| detector | install (MB) | wall ms / 512x512 image (median) | CPU ms (median) | real: found | real: eye err px (median / max) "
         "| corpus: found | corpus: eye err px (median / p90) | yaw err deg (median / p90) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["candidates"].items():
        re_, co = c["real"], c["corpus"]
        L.append(f"| {name}{' (default)' if name == r['default'] else ''} | {c['install_mb']} | {c['ms_512_median']} "
                 f"| {c['cpu_ms_512_median']} "
                 f"| {re_['found']}/{re_['of']} | {re_['eye_err_px_median']} / {re_['eye_err_px_max']} "
                 f"| {co['found']}/{co['of']} | {co['eye_err_px_median']} / {co['eye_err_px_p90']} "
                 f"| {co['yaw_err_deg_median'] or '-'} / {co['yaw_err_deg_p90'] or '-'} |")
    for name, e in r["errors"].items():
        L.append(f"| {name} | not measured: {e['error'].splitlines()[-1][:120]} | | | | | | | |")
    L += ["", "## Paste-back per frame (engine.face.Compositor.paste, one thread)", "",
          "| case | output | wall ms median | wall ms p90 | CPU ms median | load |", "|---|---|---|---|---|---|"]
    for k, v in r["paste_back"].items():
        L.append(f"| {k} | {v['output'][0]}x{v['output'][1]} | {v['ms_median']} | {v['ms_p90']} | {v['cpu_ms_median']} "
                 f"| {v['loadavg'][0]:.2f} |")
    if r["model_ms_per_frame_256_batch1"]:
        m = r["model_ms_per_frame_256_batch1"]
        L += ["", "Beside the model: G per frame at 256x256, batch 1 (benchmarks/results/backends.json): "
              + ", ".join(f"{k} {v} ms" for k, v in m.items()) + "."]
    L += ["", "## Choice", "", NOTES, ""]
    return "\n".join(L)


NOTES = """dlib (dlib-bin + face_recognition_models) is the default and a core dependency: its 68 landmarks give
the eyes, the mouth and a head-pose estimate (the "turned too far" check), it installs from wheels/sdist with no
numpy or protobuf pins, and nothing is downloaded at run time. Its HOG detector is frontal-only (a profile is
"no face found") and finds faces down to ~40 px (a second, upsampled pass finds smaller ones, to report them as
too small). OpenCV's Haar cascades (extra `opencv`) are the fallback `get_detector` uses when dlib is missing:
eyes from the eye cascade or the face box, no mouth, no pose check. mediapipe 0.10.21 is the most accurate and
fastest here, but pins numpy<2 and protobuf<5, which conflict with onnx/onnxruntime in this project's
environment; it is measured in an isolated venv only and is not wired into the engine (an isolated extra at
most). Lowering dlib's detection threshold finds more corpus faces (threshold 0 / -0.3 / -0.5 / -0.7: 12 / 19 / 20 /
25 of 40) but also false faces in scikit-image's eight non-face photos (0 / 1 / 7 / 19): it stays at 0. mediapipe
misses faces that are small in a large image (its short-range detector). The synthetic corpus faces are cartoon-like and detected less often by every candidate: corpus clips and
the built-in avatar are already in the model's framing, so the engine uses them whole when no face is found in a
driving video, and never aligns the built-in avatar."""


if __name__ == "__main__":
    main()
