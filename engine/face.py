"""Real faces in: detect, align to the corpus framing, track driving video, paste the animated crop back.

The model was trained on the synthetic corpus (`trainer.corpus.face`), whose camera puts every face in
one framing. A real photograph is brought into that framing by a similarity transform (rotation, uniform
scale, translation) computed from its eye centres and mouth; the animated 256x256 crop is composited back
into the photograph through the inverse transform, with a feathered mask and a per-frame colour match.

    crop, tf = align(photo)                      # (256,256,3) uint8 in the corpus framing, FaceTransform
    comp = Compositor(photo, tf)                 # once per avatar: background, mask, region
    frame = comp.paste(animated_crop)            # per frame: the photo with the face replaced
    frame = paste_back(animated_crop, photo, tf, output_size="original")   # the same in one call

Coordinates are pixel centres (pixel (i, j) of an image is at x = i, y = j); a `FaceTransform` maps photo
pixels to crop pixels: crop = A @ photo + t.

The corpus framing (TEMPLATE_256, measured from 2000 identities of the renderer at zero pose, camera as
in `engine.geometry`; a test keeps the numbers equal to the renderer's): at 256x256 the eye centres sit at
(100.8, 109.8) and (154.2, 109.8) (interocular distance 53.5 px), the mouth centre at (127.5, 159.2).
The corpus varies the head around that by tx/ty +-0.08 of the image, scale 0.9-1.1, roll +-16 deg,
yaw +-35 deg and pitch +-22 deg, which bounds what the model tolerates: alignment errors well inside
those ranges read as a slightly different head pose, not as a failure.

Detector (the default, "dlib"): dlib's HOG frontal face detector (model inside the `dlib-bin` wheel) and
its 68-point shape predictor (inside the `face_recognition_models` package): eye centres = mean of each
eye's six contour points, mouth = mean of the 20 lip points, head pose from six landmarks against a
generic 3D face. "opencv": OpenCV's shipped Haar cascades (face + eyes, no mouth, no pose; needs
`opencv-python-headless<5`). benchmarks/face_detectors.py compares them (and mediapipe) on speed,
accuracy and install weight. Both install from PyPI and read their models from the installed package:
nothing is downloaded at run time.

Errors (engine.errors.InputError): no face found; a face smaller than MIN_FACE_PX (the detector's box
width in the photo); a head turned beyond MAX_YAW_DEG / MAX_PITCH_DEG (estimated from the landmarks);
a face_index past the faces found. Several faces: the largest is taken and the log says so.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

CROP_SIZE = 256
# the corpus framing at 256x256 (pixel centres): image-left eye, image-right eye, mouth centre
TEMPLATE_256 = np.array([[100.77, 109.84], [154.23, 109.84], [127.50, 159.18]], np.float64)
MIN_FACE_PX = 48          # smallest face (detector box width, photo pixels) accepted as an avatar
MAX_YAW_DEG = 35.0        # the corpus' yaw range: a portrait turned further is refused
MAX_PITCH_DEG = 25.0      # the corpus' pitch range (+-22) plus the estimate's slack
FRAMED_SCALE, FRAMED_DEG, FRAMED_PX = 0.15, 5.0, 16.0  # transform_for: "already framed" tolerances
SECOND_LOOK_OFFSET = -0.35  # dlib: when nothing scores >= the threshold, look again this much lower ...
SECOND_LOOK_MIN_SIDE_FRAC = 0.3  # ... keeping only boxes at least this fraction of the image's short side
DETECT_MAX_SIDE = 800     # the detection pass runs on the photo scaled to at most this (landmarks: full size)
HOG_WINDOW_PX = 80        # dlib's HOG detector finds faces down to about its 80 px window (half that upsampled)
DETECTORS = ("dlib", "opencv")

PHOTO_TYPES = "a path, encoded bytes, a PIL image or an HxWx3 uint8 array"


# ============================================================================================ detection
@dataclass(frozen=True)
class Face:
    """One detected face in photo pixel coordinates (pixel centres)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    eyes: np.ndarray  # (2, 2): the image-left eye centre, then the image-right one
    mouth: np.ndarray | None = None  # (2,) mouth centre
    landmarks: np.ndarray | None = None  # (N, 2) all landmarks the detector gives (68 for dlib)
    pose: tuple[float, float, float] | None = None  # estimated (yaw, pitch, roll) in degrees (corpus signs)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))

    def describe(self) -> str:
        x0, y0, x1, y1 = self.box
        return f"{x1 - x0:.0f}x{y1 - y0:.0f} px at ({x0:.0f}, {y0:.0f})"


def _model_dir(package: str) -> Path | None:
    """The folder of an installed package without importing it (face_recognition_models imports
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# generic 3D face (x right, y up, z towards the camera; millimetre-like units) for the 68-point indices
_POSE_IDX = (30, 8, 36, 45, 48, 54)  # nose tip, chin, outer eye corners, mouth corners
_POSE_MODEL = np.array([[0.0, 0.0, 0.0], [0.0, -330.0, -65.0], [-225.0, 170.0, -135.0], [225.0, 170.0, -135.0],
                        [-150.0, -150.0, -125.0], [150.0, -150.0, -125.0]], np.float64)


def estimate_pose(points2d: np.ndarray, model3d: np.ndarray = _POSE_MODEL) -> tuple[float, float, float]:
    """Head pose (yaw, pitch, roll) in degrees, in the corpus' convention (R = Rz(roll) Rx(pitch) Ry(yaw);
    yaw > 0: the nose moves to the image right; pitch > 0: looks up; roll > 0: counter-clockwise in the
    image) from 2D landmarks matching a generic 3D face, by an affine (weak-perspective) camera fit.
    Rough (a generic face, no focal length): good to about 5-10 degrees, enough to refuse a profile."""
    p = np.asarray(points2d, np.float64)
    X = np.asarray(model3d, np.float64)
    A = np.concatenate([X, np.ones((len(X), 1))], 1)
    uv = np.stack([p[:, 0], -p[:, 1]], 1)  # image y down -> camera y up
    M, *_ = np.linalg.lstsq(A, uv, rcond=None)  # (4, 2)
    r1, r2 = M[:3, 0], M[:3, 1]
    r1 = r1 / (np.linalg.norm(r1) + 1e-12)
    r2 = r2 - r1 * (r1 @ r2)
    r2 = r2 / (np.linalg.norm(r2) + 1e-12)
    r3 = np.cross(r1, r2)
    # camera = R @ head; rows of R: r1, r2, r3. R[2,:] = [-cos(p) sin(y), -sin(p), cos(p) cos(y)]
    pitch = math.degrees(math.asin(float(np.clip(-r3[1], -1.0, 1.0))))
    yaw = math.degrees(math.atan2(-r3[0], r3[2]))
    roll = math.degrees(math.atan2(r2[0], r2[1]))  # in-plane angle of the head's up axis (approximate)
    return yaw, pitch, roll


def _locked(fn):
    """One call at a time per detector (a server aligns uploads on worker threads; dlib's and OpenCV's
    detectors keep scratch state)."""

    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        with self._lock:
            return fn(self, *a, **kw)

    return wrapper


class Detector:
    """Finds faces and the landmarks alignment needs. `detect(rgb)` -> faces, largest first. Thread-safe
    (calls are serialised per detector)."""

    _lock = threading.RLock()  # replaced per instance by the subclasses

    name = "base"
    gives_mouth = False
    gives_pose = False

    def detect(self, rgb: np.ndarray, *, upsample: int | None = None) -> list[Face]:  # pragma: no cover
        raise NotImplementedError

    def refine(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> Face | None:
        """Landmarks for a face known to be near `box` (tracking between detections); None if unsupported."""
        return None


class DlibDetector(Detector):
    """dlib's HOG frontal face detector + the 68-point shape predictor (face_recognition_models)."""

    name = "dlib"
    gives_mouth = True
    gives_pose = True

    def __init__(self, threshold: float = 0.0):
        try:
            import dlib  # noqa: PLC0415
        except ImportError:
            raise MissingDependency(
                "face detection needs dlib: pip install dlib-bin face_recognition_models (marionette's dependencies)"
            ) from None
        d = _model_dir("face_recognition_models")
        path = d / "models" / "shape_predictor_68_face_landmarks.dat" if d else None
        if path is None or not path.is_file():
            raise MissingDependency("face landmarks need the face_recognition_models package (a marionette "
                                    "dependency): pip install face_recognition_models")
        self._lock = threading.RLock()
        self._dlib = dlib
        self._det = dlib.get_frontal_face_detector()
        self._sp = dlib.shape_predictor(str(path))
        self.threshold = float(threshold)

    def _landmarks(self, rgb: np.ndarray, box) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        sh = self._sp(rgb, self._dlib.rectangle(x0, y0, x1, y1))
        return np.array([(p.x, p.y) for p in sh.parts()], np.float64)

    @staticmethod
    def _canonical_box(pts: np.ndarray):
        """The box dlib's detector draws around these landmarks on average (side 2.15x the interocular
        distance, centred half of it below the eye midpoint; measured on the test photos): the shape
        predictor is most accurate started from it, and detector boxes vary by a pyramid step (~20%)."""
        le, re = pts[36:42].mean(0), pts[42:48].mean(0)
        v = re - le
        iod = float(np.hypot(*v))
        n = np.array([-v[1], v[0]]) / max(iod, 1e-6)
        c = (le + re) / 2 + 0.5 * iod * n
        half = 1.075 * iod
        return (c[0] - half, c[1] - half, c[0] + half, c[1] + half)

    def _face(self, rgb: np.ndarray, box, score: float) -> Face:
        pts = self._landmarks(rgb, box)
        for _ in range(2):  # refit from the canonical box until it stops moving
            b2 = self._canonical_box(pts)
            side = b2[2] - b2[0]
            if side < 4:
                break
            moved = max(abs(b2[i] - box[i]) for i in range(4)) / side
            box = b2
            pts = self._landmarks(rgb, box)
            if moved < 0.05:
                break
        eyes = np.stack([pts[36:42].mean(0), pts[42:48].mean(0)])
        mouth = pts[48:68].mean(0)
        pose = estimate_pose(pts[list(_POSE_IDX)])
        return Face(box=tuple(float(v) for v in box), score=float(score), eyes=eyes, mouth=mouth,
                    landmarks=pts, pose=pose)

    @_locked
    def detect(self, rgb: np.ndarray, *, upsample: int | None = None) -> list[Face]:
        rgb = np.ascontiguousarray(rgb)
        h, w = rgb.shape[:2]
        k = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = rgb if k >= 1.0 else _resize(rgb, max(1, round(w * k)), max(1, round(h * k)))
        kx, ky = w / small.shape[1], h / small.shape[0]
        up = 1 if upsample is None else upsample
        rects, scores, _ = self._det.run(small, up, self.threshold)
        if not len(rects):
            # a second look with a lower threshold, for large faces only: rendered and stylised faces (the
            # synthetic corpus' portraits: 31/40 found at 0, 40/40 at -0.35) score lower than photographs,
            # while what non-face photos raise at this threshold is small (benchmarks/face_detectors.py)
            rects, scores, _ = self._det.run(small, up, self.threshold + SECOND_LOOK_OFFSET)
            keep = [i for i, r in enumerate(rects) if r.width() * kx >= SECOND_LOOK_MIN_SIDE_FRAC * min(h, w)]
            rects, scores = [rects[i] for i in keep], [scores[i] for i in keep]
        faces = []
        for r, s in zip(rects, scores):
            box = (r.left() * kx, r.top() * ky, (r.right() + 1) * kx, (r.bottom() + 1) * ky)
            faces.append(self._face(rgb, box, s))
        faces.sort(key=lambda f: -f.area)
        return faces

    @_locked
    def refine(self, rgb: np.ndarray, box) -> Face | None:
        return self._face(np.ascontiguousarray(rgb), box, float("nan"))


class OpenCVDetector(Detector):
    """OpenCV's shipped Haar cascades: frontal face, then the two eyes inside its upper half (eye centres
    from the face box when the eye cascade misses). No mouth and no pose."""

    name = "opencv"

    def __init__(self):
        try:
            import cv2  # noqa: PLC0415
        except ImportError:
            raise MissingDependency("the opencv detector needs OpenCV 4 with its Haar cascades: "
                                    "pip install 'marionette[opencv]' (opencv-python-headless<5)") from None
        root = Path(getattr(getattr(cv2, "data", None), "haarcascades", ""))
        face_xml, eye_xml = root / "haarcascade_frontalface_default.xml", root / "haarcascade_eye.xml"
        if not face_xml.is_file() or not eye_xml.is_file():
            raise MissingDependency(f"this OpenCV ({cv2.__version__}) ships no Haar cascades (OpenCV 5 dropped "
                                    "them): pip install 'opencv-python-headless<5'")
        self._lock = threading.RLock()
        self._cv2 = cv2
        self._face = cv2.CascadeClassifier(str(face_xml))
        self._eye = cv2.CascadeClassifier(str(eye_xml))

    @_locked
    def detect(self, rgb: np.ndarray, *, upsample: int | None = None) -> list[Face]:
        cv2 = self._cv2
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        h, w = grey.shape
        k = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = grey if k >= 1.0 else cv2.resize(grey, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
        if upsample:
            small = cv2.resize(small, None, fx=2.0 ** upsample, fy=2.0 ** upsample, interpolation=cv2.INTER_LINEAR)
        kx, ky = w / small.shape[1], h / small.shape[0]
        boxes, _, weights = self._face.detectMultiScale3(small, 1.1, 5, minSize=(24, 24), outputRejectLevels=True)
        faces = []
        for (x, y, bw, bh), sc in zip(boxes, np.ravel(weights) if len(boxes) else []):
            box = (x * kx, y * ky, (x + bw) * kx, (y + bh) * ky)
            faces.append(Face(box=box, score=float(sc), eyes=self._eyes(grey, box)))
        faces.sort(key=lambda f: -f.area)
        return faces

    def _eyes(self, grey: np.ndarray, box) -> np.ndarray:
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        # the eye centres of a Haar face box on average (from dlib landmarks on the same boxes)
        guess = np.array([[x0 + 0.31 * bw, y0 + 0.40 * bh], [x0 + 0.69 * bw, y0 + 0.40 * bh]])
        ys, ye = int(max(0, y0 + 0.15 * bh)), int(min(grey.shape[0], y0 + 0.6 * bh))
        xs, xe = int(max(0, x0)), int(min(grey.shape[1], x1))
        roi = grey[ys:ye, xs:xe]
        if roi.size == 0:
            return guess
        m = max(8, int(0.12 * bw))
        found = self._eye.detectMultiScale(roi, 1.1, 4, minSize=(m, m), maxSize=(int(0.45 * bw), int(0.45 * bw)))
        out = guess.copy()
        for side in (0, 1):
            best = None
            for ex, ey, ew, eh in found:
                c = np.array([xs + ex + ew / 2.0 - 0.5, ys + ey + eh / 2.0 - 0.5])
                if (c[0] < x0 + bw / 2) != (side == 0):
                    continue
                d = np.linalg.norm(c - guess[side])
                if d < 0.18 * bw and (best is None or d < best[0]):
                    best = (d, c)
            if best is not None:
                out[side] = best[1]
        return out


_DETECTORS: dict[str, Detector] = {}
_DETECTORS_LOCK = threading.Lock()


def available_detectors() -> list[str]:
    out = []
    if importlib.util.find_spec("dlib") is not None and _model_dir("face_recognition_models") is not None:
        out.append("dlib")
    if importlib.util.find_spec("cv2") is not None:
        out.append("opencv")
    return out


def get_detector(name: str | Detector | None = None) -> Detector:
    """A detector by name ("dlib", "opencv"; None/"auto": dlib, else OpenCV's cascades where only they
    are installed), created once per process and shared (they are read-only after loading)."""
    if isinstance(name, Detector):
        return name
    if name in (None, "auto"):
        have = available_detectors()
        if not have:
            raise MissingDependency("real photographs need a face detector: pip install dlib-bin "
                                    "face_recognition_models (marionette's dependencies), or 'opencv-python-headless<5'")
        name = have[0]
        if name != "dlib":
            log.warning("face detection: dlib is not installed, using OpenCV's Haar cascades (less accurate, "
                        "no head-pose check); pip install dlib-bin face_recognition_models for the default")
    if name not in DETECTORS:
        raise InputError(f"unknown face detector {name!r}; available: {', '.join(DETECTORS)}")
    with _DETECTORS_LOCK:
        det = _DETECTORS.get(name)
        if det is None:
            det = _DETECTORS[name] = DlibDetector() if name == "dlib" else OpenCVDetector()
    return det


# ============================================================================================ transform
@dataclass(frozen=True)
class FaceTransform:
    """photo pixel -> crop pixel: crop = matrix[:, :2] @ p + matrix[:, 2] (a similarity), plus what it
    was computed from."""

    matrix: np.ndarray  # (2, 3)
    crop_size: int
    image_size: tuple[int, int]  # the photo's (width, height)
    face: Face | None = field(default=None, compare=False)

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel."""
        return float(math.hypot(self.matrix[0, 0], self.matrix[1, 0]))

    @property
    def angle(self) -> float:
        """Rotation applied to the photo, degrees (counter-clockwise in the image)."""
        return float(math.degrees(math.atan2(-self.matrix[1, 0], self.matrix[0, 0])))

    def inverse(self) -> np.ndarray:
        """(2, 3) crop pixel -> photo pixel."""
        return _invert(self.matrix)

    def apply(self, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, np.float64)
        return p @ self.matrix[:, :2].T + self.matrix[:, 2]

    def params(self) -> np.ndarray:
        """[cx, cy, log scale, angle (rad)]: the photo point at the crop centre, the scale and rotation."""
        c = (self.crop_size - 1) / 2.0
        centre = self.inverse() @ np.array([c, c, 1.0])
        a = math.atan2(self.matrix[1, 0], self.matrix[0, 0])
        return np.array([centre[0], centre[1], math.log(self.scale), a])

    @classmethod
    def from_params(cls, p: np.ndarray, crop_size: int, image_size, face: Face | None = None) -> "FaceTransform":
        s, a = math.exp(p[2]), p[3]
        A = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        c = (crop_size - 1) / 2.0
        t = np.array([c, c]) - A @ np.asarray(p[:2], np.float64)
        return cls(np.concatenate([A, t[:, None]], 1), crop_size, tuple(image_size), face)

    @classmethod
    def identity_square(cls, width: int, height: int, crop_size: int) -> "FaceTransform":
        """The old framing: centre square of the photo scaled to the crop (no face)."""
        s = min(width, height)
        k = crop_size / s
        # pixel centres: crop x = (p - left + 0.5) * k - 0.5
        left, top = (width - s) / 2.0, (height - s) / 2.0
        m = np.array([[k, 0.0, (0.5 - left) * k - 0.5], [0.0, k, (0.5 - top) * k - 0.5]])
        return cls(m, crop_size, (int(width), int(height)))


def _invert(m: np.ndarray) -> np.ndarray:
    A = m[:, :2]
    Ai = np.linalg.inv(A)
    return np.concatenate([Ai, (-Ai @ m[:, 2])[:, None]], 1)


def template(size: int = CROP_SIZE) -> np.ndarray:
    """(3, 2) eye-left, eye-right, mouth of the corpus framing at size x size (pixel centres)."""
    return (TEMPLATE_256 + 0.5) * (size / 256.0) - 0.5


def similarity_from_landmarks(eyes: np.ndarray, mouth: np.ndarray | None, crop_size: int = CROP_SIZE) -> np.ndarray:
    """(2, 3) photo -> crop similarity that puts the eye line level and maps the eyes and mouth onto the
    corpus template: rotation from the eye line, scale from the mean of the interocular and eye-to-mouth
    ratios (robust to a little yaw, which shortens only the first), translation from the midpoint of the
    eye centre and the mouth. Without a mouth, eyes only."""
    eyes = np.asarray(eyes, np.float64)
    T = template(crop_size)
    t_mid = (T[0] + T[1]) / 2.0
    t_eye = float(T[1, 0] - T[0, 0])
    t_em = float(T[2, 1] - t_mid[1])
    v = eyes[1] - eyes[0]
    d_eye = float(np.hypot(*v))
    if d_eye < 1e-6:
        raise InputError("the face's eyes coincide (landmarks failed); try another photo")
    theta = math.atan2(v[1], v[0])
    mid = eyes.mean(0)
    n = np.array([-math.sin(theta), math.cos(theta)])  # unit normal of the eye line, pointing down
    ratios = [t_eye / d_eye]
    if mouth is not None:
        d_em = float((np.asarray(mouth, np.float64) - mid) @ n)
        if d_em > 0.25 * d_eye:  # a plausible mouth: below the eye line
            ratios.append(t_em / d_em)
        else:
            mouth = None
    s = float(np.mean(ratios))
    c, si = math.cos(-theta), math.sin(-theta)
    A = s * np.array([[c, -si], [si, c]])
    if mouth is not None:
        src_anchor = (mid + np.asarray(mouth, np.float64)) / 2.0
        dst_anchor = (t_mid + T[2]) / 2.0
    else:
        src_anchor, dst_anchor = mid, t_mid
    t = dst_anchor - A @ src_anchor
    return np.concatenate([A, t[:, None]], 1)


# ============================================================================================ images
def load_photo(src: Any) -> np.ndarray:
    """A photograph (path, bytes, PIL image, HxW[x1|3|4] array) -> HxWx3 uint8 RGB at its own resolution
    (EXIF orientation applied, transparency over mid grey; the rules of engine.image)."""
    from engine.image import load_rgb  # noqa: PLC0415

    return load_rgb(src)


def _resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    return np.asarray(Image.fromarray(rgb).resize((int(w), int(h)), Image.Resampling.LANCZOS))


def warp_affine(img: np.ndarray, out_to_in: np.ndarray, width: int, height: int, *,
                resample: str = "bilinear", fill: tuple[int, ...] | int = 0) -> np.ndarray:
    """Resample `img` (HxW or HxWxC uint8) into a width x height image whose pixel p takes img at
    out_to_in @ [p, 1] (pixel centres). PIL's affine transform, whose coordinates are pixel corners."""
    from PIL import Image  # noqa: PLC0415

    A, b = out_to_in[:, :2], out_to_in[:, 2]
    b2 = b + 0.5 - A @ np.array([0.5, 0.5])  # centre coordinates -> corner coordinates
    data = (A[0, 0], A[0, 1], b2[0], A[1, 0], A[1, 1], b2[1])
    mode = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}[resample]
    im = Image.fromarray(np.ascontiguousarray(img))
    if isinstance(fill, int) and im.mode == "RGB":
        fill = (fill,) * 3
    return np.asarray(im.transform((int(width), int(height)), Image.Transform.AFFINE, data, mode, fillcolor=fill))


def crop_with(photo: np.ndarray, tf: FaceTransform, size: int | None = None) -> np.ndarray:
    """The aligned size x size crop of `photo` under `tf` (areas outside the photo repeat its edge).
    A photo much larger than the crop is first reduced with Lanczos, so the crop does not alias."""
    size = size or tf.crop_size
    m = tf.matrix.copy()
    if size != tf.crop_size:
        k = size / tf.crop_size
        m = np.concatenate([m[:, :2] * k, ((m[:, 2] + 0.5) * k - 0.5)[:, None]], 1)
    img = photo
    s = float(math.hypot(m[0, 0], m[1, 0]))
    if s < 0.5:
        # only the part of the photo under the crop (and the filter's reach) is reduced: video frames are
        # much larger than the face's square
        inv = _invert(m)
        corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
        p = corners @ inv.T
        margin = 8.0 / s
        h, w = photo.shape[:2]
        x0, y0 = int(max(0, math.floor(p[:, 0].min() - margin))), int(max(0, math.floor(p[:, 1].min() - margin)))
        x1, y1 = int(min(w, math.ceil(p[:, 0].max() + margin))), int(min(h, math.ceil(p[:, 1].max() + margin)))
        if x1 - x0 >= 2 and y1 - y0 >= 2 and (x1 - x0) * (y1 - y0) < 0.8 * w * h:
            img = photo[y0:y1, x0:x1]
            m = _compose(m, np.array([[1.0, 0.0, float(x0)], [0.0, 1.0, float(y0)]]))  # sub-image -> photo -> crop
            photo = img
    if s < 0.5:  # reduce the photo to ~1.5x the crop's resolution first (box-filtered, no aliasing)
        k = min(1.0, 1.5 * s)
        h, w = photo.shape[:2]
        nw, nh = max(1, round(w * k)), max(1, round(h * k))
        img = _resize(photo, nw, nh)
        kx, ky = nw / w, nh / h  # p_small = (p + 0.5) * k - 0.5
        S = np.array([[kx, 0.0, 0.5 * kx - 0.5], [0.0, ky, 0.5 * ky - 0.5]])
        m = _compose(m, _invert(S))  # small -> photo -> crop
    # outside the photo: replicate the edge (pad by reflection of the border row/column, cheap and seamless)
    pad = _edge_pad(img, m, size)
    if pad is not None:
        img, off = pad
        m = _compose(m, np.array([[1.0, 0.0, -off], [0.0, 1.0, -off]]))
    return warp_affine(img, _invert(m), size, size, resample="bicubic")


def _edge_pad(img: np.ndarray, m: np.ndarray, size: int):
    """Edge-replicate `img` when the crop reaches outside it; returns (padded, offset) or None."""
    inv = _invert(m)
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
    p = corners @ inv.T
    h, w = img.shape[:2]
    need = max(0.0, -p[:, 0].min(), -p[:, 1].min(), p[:, 0].max() - (w - 1), p[:, 1].max() - (h - 1))
    if need <= 0:
        return None
    off = int(math.ceil(need)) + 2
    return np.pad(img, ((off, off), (off, off), (0, 0)), mode="edge"), off


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(2,3) a after b: x -> a(b(x))."""
    A = a[:, :2] @ b[:, :2]
    t = a[:, :2] @ b[:, 2] + a[:, 2]
    return np.concatenate([A, t[:, None]], 1)


# ============================================================================================ align
class Aligned(NamedTuple):
    crop: np.ndarray  # (S, S, 3) uint8
    transform: FaceTransform


def find_face(photo: np.ndarray, *, detector: str | Detector | None = None, face_index: int | None = None,
              min_face: int = MIN_FACE_PX, check_pose: bool = True, what: str = "image") -> Face:
    """The face to animate in `photo` (HxWx3 uint8): the largest (or face_index-th largest) one, checked
    against the minimum size and the supported head turn. InputError otherwise."""
    det = get_detector(detector)
    h, w = photo.shape[:2]
    if photo.ndim != 3 or photo.shape[2] != 3:
        raise InputError(f"{what}: expected an RGB image, got shape {photo.shape}")
    if float(photo.max()) - float(photo.min()) < 8:
        raise InputError(f"no face found in {what} ({w}x{h}): the image is blank (one flat colour)")
    faces = det.detect(photo)
    if not faces and max(h, w) <= 1024:
        faces = det.detect(photo, upsample=2)  # a second look for small faces (to say they are too small)
    if not faces:
        raise InputError(f"no face found in {what} ({w}x{h}); a portrait needs one frontal or slightly turned "
                         f"face at least {min_face} px wide")
    idx = 0 if face_index is None else int(face_index)
    if len(faces) > 1:
        listing = "; ".join(f"#{i}: {f.describe()}" for i, f in enumerate(faces))
        log.info("found %d faces in %s (%s); using #%d%s", len(faces), what, listing, idx,
                 " (the largest; face_index / --face-index picks another)" if face_index is None else "")
    if not 0 <= idx < len(faces):
        raise InputError(f"face index {idx} asked for, but {what} has {len(faces)} face(s) "
                         f"(valid: 0..{len(faces) - 1}, largest first)")
    face = faces[idx]
    if face.width < min_face:
        raise InputError(f"the face in {what} is too small: {face.width:.0f} px wide; the minimum is {min_face} px "
                         f"(the model animates a {CROP_SIZE}x{CROP_SIZE} crop in which the face is ~120 px wide)")
    if check_pose and face.pose is not None:
        yaw, pitch, _ = face.pose
        if abs(yaw) > MAX_YAW_DEG or abs(pitch) > MAX_PITCH_DEG:
            raise InputError(
                f"the head in {what} is turned too far (estimated yaw {yaw:+.0f} deg, pitch {pitch:+.0f} deg); "
                f"the model supports up to +-{MAX_YAW_DEG:.0f} deg left/right and +-{MAX_PITCH_DEG:.0f} deg "
                "up/down: use a more frontal photo")
    return face


def transform_for(face: Face, image_size: tuple[int, int], crop_size: int = CROP_SIZE) -> FaceTransform:
    """The photo -> crop similarity for `face`. A square image whose face already sits in the corpus framing
    (within the landmarks' own error: scale within FRAMED_SCALE, eye line within FRAMED_DEG, face centre
    within FRAMED_PX crop pixels of a plain resize) is resized, not re-aligned: a 5 px landmark error must not
    move a portrait that is framed as the model's own (corpus renders, crops from `ingest`)."""
    m = similarity_from_landmarks(face.eyes, face.mouth, crop_size)
    w, h = int(image_size[0]), int(image_size[1])
    if w == h:
        k = crop_size / w
        plain = np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5]])
        pts = face.eyes if face.mouth is None else np.vstack([face.eyes, np.asarray(face.mouth)[None]])
        c = np.append(np.asarray(pts, np.float64).mean(0), 1.0)
        scale = float(math.hypot(m[0, 0], m[1, 0]))
        angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
        if (abs(scale / k - 1.0) < FRAMED_SCALE and abs(angle) < FRAMED_DEG
                and float(np.hypot(*((m - plain) @ c))) < FRAMED_PX * crop_size / 256.0):
            log.debug("the face is already in the model's framing: resized, not re-aligned")
            m = plain
    return FaceTransform(m, crop_size, (w, h), face)


def align(image: Any, size: int = CROP_SIZE, *, detector: str | Detector | None = None,
          face_index: int | None = None, min_face: int = MIN_FACE_PX, check_pose: bool = True) -> Aligned:
    """A photograph -> (size x size uint8 crop in the corpus framing, its FaceTransform)."""
    what = _describe(image)
    photo = image if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 \
        and image.dtype == np.uint8 else load_photo(image)
    face = find_face(photo, detector=detector, face_index=face_index, min_face=min_face,
                     check_pose=check_pose, what=what)
    tf = transform_for(face, (photo.shape[1], photo.shape[0]), size)
    log.debug("aligned %s: face %s, scale %.3f, rotation %.1f deg", what, face.describe(), tf.scale, tf.angle)
    return Aligned(crop_with(photo, tf), tf)


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return f"image {str(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image ({len(src)} bytes)"
    return "image"


# ============================================================================================ paste back
FEATHER = 0.10  # feather width of the paste mask, as a fraction of the crop size


def crop_mask(size: int = CROP_SIZE, feather: float = FEATHER) -> np.ndarray:
    """(size, size) float32 in [0, 1]: where the animated crop replaces the photo. An ellipse around the
    head and upper neck (everything the model moves: head pose moves the hair outline too), feathered
    with a smoothstep over `feather * size` pixels, and zero at the crop's border (no visible box)."""
    s = size / 256.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy, rx, ry = 127.5 * s, 122.0 * s, 112.0 * s, 128.0 * s
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)  # 1 on the ellipse
    fw = feather * size
    d_ell = (1.0 - r) * min(rx, ry)  # ~ distance inside the ellipse, pixels
    d_box = np.minimum(np.minimum(x, size - 1 - x), np.minimum(y, size - 1 - y)) - 1.0
    d = np.minimum(d_ell, d_box)
    t = np.clip(d / fw, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def parse_output_size(spec: str | int | tuple[int, int] | None, default: str = "original"):
    """--output-size: "original" (the photo at its own size), "crop" (the aligned crop only), "N" (an N x N
    frame around the face) or "WxH" (a W x H frame around the face). -> "original" | "crop" | (W, H)."""
    if spec is None:
        spec = default
    if isinstance(spec, tuple):
        w, h = spec
    elif isinstance(spec, int):
        w = h = spec
    else:
        s = str(spec).strip().lower()
        if s in ("original", "crop"):
            return s
        try:
            if "x" in s:
                w, h = (int(v) for v in s.split("x", 1))
            else:
                w = h = int(s)
        except ValueError:
            raise InputError(f"output size {spec!r}: use original, crop, N (N x N around the face) or WxH") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise InputError(f"output size {w}x{h} out of range (16..8192 per side)")
    return (int(w), int(h))


def frame_window(tf: FaceTransform, out_w: int, out_h: int, reach: float = 2.0) -> np.ndarray:
    """(2, 3) photo -> output frame for a W x H frame around the face: the largest window of the photo
    with the frame's aspect that is at most `reach` x the crop's side (in photo pixels) on its longer
    side and fits inside the photo, centred on the face as nearly as it can be, scaled to W x H."""
    pw, ph = tf.image_size
    side = reach * tf.crop_size / tf.scale  # photo pixels
    aspect = out_w / out_h
    ww, wh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    k = min(1.0, pw / ww, ph / wh)
    ww, wh = ww * k, wh * k
    c = (tf.crop_size - 1) / 2.0
    cx, cy = tf.inverse() @ np.array([c, c, 1.0])
    x0 = float(np.clip(cx + 0.5 - ww / 2.0, 0.0, pw - ww))  # corner coordinates
    y0 = float(np.clip(cy + 0.5 - wh / 2.0, 0.0, ph - wh))
    kx, ky = out_w / ww, out_h / wh
    # out = (p + 0.5 - x0) * k - 0.5
    return np.array([[kx, 0.0, (0.5 - x0) * kx - 0.5], [0.0, ky, (0.5 - y0) * ky - 0.5]])


class Compositor:
    """Pastes animated crops back into a photograph. Built once per avatar (the output frame's background,
    the mask warped into it and the region it covers); `paste(crop)` per frame.

    output_size: "original" (the photo's own size), "crop" (no paste: the crop itself), or (W, H) / "N" /
    "WxH" (a frame around the face, `frame_window`). source_crop: the aligned crop the avatar was
    prepared from (uint8); with it every frame is colour-matched to the photo along the mask's feather
    (the per-channel mean difference there is removed), so no colour seam shows."""

    def __init__(self, photo: np.ndarray, tf: FaceTransform, output_size="original",
                 source_crop: np.ndarray | None = None, feather: float = FEATHER):
        spec = parse_output_size(output_size)
        self.transform = tf
        self.crop_only = spec == "crop"
        s = tf.crop_size
        self.mask = crop_mask(s, feather)
        self.source_crop = None if source_crop is None else np.asarray(source_crop, np.float32)
        ring = (self.mask > 0.02) & (self.mask < 0.7)
        self._ring = ring
        if self.crop_only:
            self.size = (s, s)
            return
        ph, pw = photo.shape[:2]
        if (pw, ph) != tuple(tf.image_size):
            raise InputError(f"photo is {pw}x{ph} but the transform was made for {tf.image_size[0]}x{tf.image_size[1]}")
        if spec == "original":
            to_out = np.array([[1.0, 0, 0], [0, 1.0, 0]])
            ow, oh = pw, ph
            self.background = np.ascontiguousarray(photo)
        else:
            ow, oh = spec
            to_out = frame_window(tf, ow, oh)
            self.background = warp_affine(photo, _invert(to_out), ow, oh, resample="bicubic")
        self.size = (ow, oh)
        self.crop_to_out = _compose(to_out, tf.inverse())
        # the region the crop covers in the output (its mask > 0), with a pixel of margin
        corners = np.array([[0, 0, 1], [s - 1, 0, 1], [0, s - 1, 1], [s - 1, s - 1, 1]], np.float64) @ self.crop_to_out.T
        x0 = int(max(0, math.floor(corners[:, 0].min()) - 1))
        y0 = int(max(0, math.floor(corners[:, 1].min()) - 1))
        x1 = int(min(ow, math.ceil(corners[:, 0].max()) + 2))
        y1 = int(min(oh, math.ceil(corners[:, 1].max()) + 2))
        self.region = (x0, y0, x1, y1)
        if x1 <= x0 or y1 <= y0:
            raise InputError("the face lies outside the output frame")
        shift = np.array([[1.0, 0, float(x0)], [0, 1.0, float(y0)]])  # region pixel -> output pixel
        self._region_to_crop = _compose(_invert(self.crop_to_out), shift)
        m8 = np.clip(self.mask * 255.0 + 0.5, 0, 255).astype(np.uint8)
        self.region_mask = (warp_affine(m8, self._region_to_crop, x1 - x0, y1 - y0).astype(np.float32) / 255.0)[..., None]
        # per frame: out = warped * m + (background * (1 - m) + 0.5), the second term computed once
        self._bg_term = self.background[y0:y1, x0:x1].astype(np.float32) * (1.0 - self.region_mask) + 0.5
        # the sampling grid of the warp (torch grid_sample units), fixed for the avatar
        rh, rw = y1 - y0, x1 - x0
        yy, xx = np.mgrid[0:rh, 0:rw].astype(np.float64)
        m = self._region_to_crop
        gx = (m[0, 0] * xx + m[0, 1] * yy + m[0, 2] + 0.5) * (2.0 / s) - 1.0
        gy = (m[1, 0] * xx + m[1, 1] * yy + m[1, 2] + 0.5) * (2.0 / s) - 1.0
        import torch  # noqa: PLC0415

        self._grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))

    def colour_offset(self, crop: np.ndarray) -> np.ndarray:
        """Per-channel mean of (frame - source crop) over the mask's feather ring (0 without a source)."""
        if self.source_crop is None:
            return np.zeros(3, np.float32)
        d = crop[self._ring].astype(np.float32) - self.source_crop[self._ring]
        return d.mean(0)

    def paste(self, crop: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 animated crop -> (H, W, 3) uint8 output frame."""
        return self.paste_batch(np.asarray(crop)[None])[0]

    def paste_batch(self, crops: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 animated crops -> (B, H, W, 3) uint8 output frames: each colour-matched
        (`colour_offset`), warped into the output by bilinear grid_sample and blended through the mask."""
        import torch  # noqa: PLC0415

        crops = np.asarray(crops)
        s = self.transform.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
            raise InputError(f"crops must be (B, {s}, {s}, 3) uint8, got {crops.shape}")
        x = crops.astype(np.float32)
        offs = np.stack([self.colour_offset(c) for c in crops])  # (B, 3)
        x -= offs[:, None, None, :]
        if self.crop_only:
            return np.clip(x + 0.5, 0, 255).astype(np.uint8)
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        w = torch.nn.functional.grid_sample(t, self._grid.expand(len(crops), -1, -1, -1), mode="bilinear",
                                            padding_mode="border", align_corners=False)
        warped = w.permute(0, 2, 3, 1).numpy()
        x0, y0, x1, y1 = self.region
        blended = np.clip(warped * self.region_mask + self._bg_term, 0, 255.4).astype(np.uint8)
        out = np.repeat(self.background[None], len(crops), 0)
        out[:, y0:y1, x0:x1] = blended
        return out


def paste_back(frame_crop: np.ndarray, original_image: np.ndarray, transform: FaceTransform,
               output_size="original", source_crop: np.ndarray | None = None) -> np.ndarray:
    """One animated crop composited into the photo (see Compositor; build one Compositor for many frames)."""
    return Compositor(original_image, transform, output_size, source_crop=source_crop).paste(frame_crop)


# ============================================================================================ portraits
@dataclass(frozen=True, eq=False)
class FacePortrait:
    """What an avatar made from a photograph keeps beside its model tensors: the alignment and the
    compositor that puts its animated frames back (None: the frames are the crop)."""

    transform: FaceTransform
    crop: np.ndarray
    compositor: Compositor | None = None

    @property
    def output_size(self) -> tuple[int, int]:
        return self.compositor.size if self.compositor is not None else (self.transform.crop_size,) * 2

    def paste(self, crops: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 -> (B, H, W, 3) uint8 (the crops unchanged without a compositor)."""
        if self.compositor is None:
            return crops
        return self.compositor.paste_batch(crops)


def prepare_portrait(image: Any, size: int = CROP_SIZE, *, output_size="original",
                     detector: str | Detector | None = None, face_index: int | None = None) -> FacePortrait:
    """Photo -> FacePortrait (aligned crop, transform, compositor for `output_size`)."""
    photo = load_photo(image)
    crop, tf = _align_described(photo, image, size, detector, face_index)
    spec = parse_output_size(output_size)
    comp = Compositor(photo, tf, spec, source_crop=crop) if spec != "crop" else None
    return FacePortrait(tf, crop, comp)


def _align_described(photo, src, size, detector, face_index) -> Aligned:
    what = _describe(src)
    face = find_face(photo, detector=detector, face_index=face_index, what=what)
    tf = transform_for(face, (photo.shape[1], photo.shape[0]), size)
    return Aligned(crop_with(photo, tf), tf)


def attach(state: Any, portrait: FacePortrait) -> Any:
    """The avatar state with `portrait` attached as `.face` (AvatarState is frozen: a copy)."""
    try:
        return replace(state, face=portrait)
    except TypeError:
        state.face = portrait
        return state


# ============================================================================================ tracking
class FaceTracker:
    """Face framing for a video (driving videos, webcams): detect, then follow.

    Every frame's landmarks come from the detector's landmark model started at the previous face box
    (dlib: ~2 ms); a full detection runs on the first frame, every `detect_every` frames and whenever the
    face is lost. Per-frame alignments are smoothed (EMA, `smooth` = weight of the new frame) and the
    crop follows them only outside a dead zone (`hold`: a fraction of the crop for translation, a scale
    ratio and degrees): head motion inside the corpus' pose ranges stays in the crop, where the motion
    encoder reads it as pose; larger drifts (a camera pan, a person walking) are followed.

    `update(frame)` -> FaceTransform, or None until a face has been seen (the caller then uses the whole
    frame). `lost` counts frames where no face was found (the last framing is held).

    After each `update`: `face` is the face followed in that frame (None: lost), `detected` whether a full
    detection ran on it and `faces` what that detection found (largest first; empty when none ran).
    `confirmed` whether the face was found by that detection (not followed by landmarks alone).
    `strict` (training data, `trainer.ingest`): a detector miss is retried on each following frame (the
    landmarks keep following meanwhile), and after `max_miss` misses in a row the face is gone: no
    following the last box's landmarks for ever, which a shape model fits to anything; without a face the
    tracker detects on every frame until one is back. `update(frame, detect=True)` forces a full
    detection; `reset()` forgets the face and the framing (a shot cut)."""

    def __init__(self, detector: str | Detector | None = None, crop_size: int = CROP_SIZE, detect_every: int = 10,
                 smooth: float = 0.5, hold: tuple[float, float, float] = (0.06, 1.08, 12.0), strict: bool = False,
                 max_miss: int = 5, min_face: int | None = None):
        self.det = get_detector(detector)
        self.crop_size = crop_size
        self.detect_every = max(1, int(detect_every))
        self.smooth = float(smooth)
        self.hold = hold
        self.strict = bool(strict)
        self.max_miss = max(0, int(max_miss))
        # faces smaller than this (frame pixels) are of no interest: dlib's detector then skips its 2x
        # upsampled pass when they are still >= its 80 px window at the detection scale (4x less work)
        self.min_face = min_face
        self.misses = 0  # strict: detector misses in a row while the landmarks still follow a face
        self.confirmed = False
        self.n = 0
        self.lost = 0
        self.detections = 0
        self.face: Face | None = None
        self.holding = False  # strict: no face in this frame, but the framing is held while misses are retried
        self.detected = False
        self.faces: list[Face] = []
        self._box = None
        self._p = None  # smoothed per-frame params
        self._ref = None  # the framing in use
        self._size = None

    def reset(self) -> None:
        """Forget the followed face and the framing: the next frame is detected afresh (a shot cut)."""
        self._box = self._p = self._ref = None
        self.face = None
        self.misses = 0

    def _detect(self, frame: np.ndarray) -> Face | None:
        self.detections += 1
        self.detected = True
        up = None
        if self.min_face is not None:
            h, w = frame.shape[:2]
            up = 0 if self.min_face * min(1.0, DETECT_MAX_SIDE / max(h, w)) >= HOG_WINDOW_PX else None
        faces = self.det.detect(frame, upsample=up)
        self.faces = list(faces)
        if not faces:
            return None
        if self._box is not None and len(faces) > 1:  # keep following the same person
            cx, cy = (self._box[0] + self._box[2]) / 2, (self._box[1] + self._box[3]) / 2
            faces.sort(key=lambda f: (f.box[0] + f.box[2] - 2 * cx) ** 2 + (f.box[1] + f.box[3] - 2 * cy) ** 2)
        return faces[0]

    def update(self, frame: np.ndarray, detect: bool = False) -> FaceTransform | None:
        frame = np.ascontiguousarray(frame)
        h, w = frame.shape[:2]
        self._size = (w, h)
        self.detected, self.faces, self.confirmed = False, [], False
        if self.strict:
            face = self._strict_face(frame, detect)
        else:
            face = None
            # detect: on the first frames, every detect_every frames, and (when the face was lost) again at
            # the next detect_every boundary; in between, landmarks follow the last box
            if detect or self.n % self.detect_every == 0 or (self._box is None and self.n < 3):
                face = self._detect(frame)
                self.confirmed = face is not None
            if face is None and self._box is not None:
                face = self.det.refine(frame, self._box)
                if face is not None and not self._plausible(face):
                    face = self._detect(frame)
                    self.confirmed = face is not None
        self.n += 1
        self.face = face
        self.holding = face is None and self._box is not None
        if face is None:
            self.lost += 1
            if self._ref is None:
                return None
            return FaceTransform.from_params(self._ref, self.crop_size, (w, h))
        # the next box: a square around the landmarks (dlib boxes are ~1.1x the landmark extent)
        self._box = self._box_from(face)
        p = transform_for(face, (w, h), self.crop_size).params()
        if self._p is None:
            self._p, self._ref = p.copy(), p.copy()
        else:
            d = p - self._p
            d[3] = (d[3] + math.pi) % (2 * math.pi) - math.pi
            self._p = self._p + self.smooth * d
            self._ref = self._follow(self._ref, self._p)
        return FaceTransform.from_params(self._ref, self.crop_size, (w, h), face)

    def _strict_face(self, frame: np.ndarray, detect: bool) -> Face | None:
        """strict: detect on schedule, after a miss and without a face; follow with landmarks in between.
        A miss (a detection finding nothing) is retried on the next frames while the landmarks follow, or
        the framing is held when they do not fit (`holding`); `max_miss` misses in a row lose the face."""
        face = None
        if detect or self.n % self.detect_every == 0 or self.misses > 0 or self._box is None:
            face = self._detect(frame)
            self.confirmed = face is not None
        if face is None and self._box is not None:
            f = self.det.refine(frame, self._box)
            if f is not None and self._plausible(f):
                face = f
            elif not self.detected:
                face = self._detect(frame)
                self.confirmed = face is not None
        if self.confirmed:
            self.misses = 0
        elif self.detected:
            self.misses += 1
            if self.misses > self.max_miss or self._box is None:
                self._box, face, self.misses = None, None, 0
        return face

    def _plausible(self, face: Face) -> bool:
        if face.landmarks is None:
            return True
        x0, y0, x1, y1 = self._box
        pts = face.landmarks
        lx0, ly0 = pts.min(0)
        lx1, ly1 = pts.max(0)
        bw = x1 - x0
        inside = lx0 > x0 - 0.3 * bw and lx1 < x1 + 0.3 * bw and ly0 > y0 - 0.3 * bw and ly1 < y1 + 0.3 * bw
        d_eye = float(np.hypot(*(face.eyes[1] - face.eyes[0])))
        # the box is 1.1x the last landmarks' extent: a fit that shrinks or grows by more than ~25% in one
        # frame is the shape model collapsing (it fits a face to anything), not the head moving
        ext = float(max(lx1 - lx0, ly1 - ly0))
        return bool(inside and 0.2 * bw < d_eye < 0.7 * bw and 0.7 * bw < ext < 1.2 * bw)

    @staticmethod
    def _box_from(face: Face):
        if face.landmarks is None:
            return face.box
        pts = face.landmarks
        c = (pts.min(0) + pts.max(0)) / 2
        half = 0.55 * float(max(pts.max(0) - pts.min(0)))
        return (c[0] - half, c[1] - half, c[0] + half, c[1] + half)

    def _follow(self, ref: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Move the framing only as far as needed to bring `p` back inside the dead zone around it."""
        t_frac, s_ratio, a_deg = self.hold
        out = ref.copy()
        scale = math.exp(ref[2])
        lim = t_frac * self.crop_size / scale  # photo pixels
        for i in (0, 1):
            d = p[i] - ref[i]
            if abs(d) > lim:
                out[i] = p[i] - math.copysign(lim, d)
        ls = math.log(s_ratio)
        d = p[2] - ref[2]
        if abs(d) > ls:
            out[2] = p[2] - math.copysign(ls, d)
        la = math.radians(a_deg)
        d = (p[3] - ref[3] + math.pi) % (2 * math.pi) - math.pi
        if abs(d) > la:
            out[3] = ref[3] + d - math.copysign(la, d)
        return out


def track_crops(frames: Sequence[np.ndarray] | Any, size: int = CROP_SIZE, tracker: FaceTracker | None = None):
    """Generator: (crop uint8, FaceTransform or None) per frame; frames without a face framing yet are
    centre-cropped as before."""
    tracker = tracker or FaceTracker(crop_size=size)
    for fr in frames:
        tf = tracker.update(fr)
        if tf is None:
            h, w = fr.shape[:2]
            tf0 = FaceTransform.identity_square(w, h, size)
            yield crop_with(fr, tf0), None
        else:
            yield crop_with(fr, tf), tf


__all__ = ["Face", "Detector", "DlibDetector", "OpenCVDetector", "get_detector", "available_detectors",
           "FaceTransform", "Aligned", "align", "find_face", "transform_for", "similarity_from_landmarks",
           "crop_with", "warp_affine", "crop_mask", "Compositor", "paste_back", "parse_output_size",
           "frame_window", "FacePortrait", "prepare_portrait", "attach", "FaceTracker", "track_crops",
           "estimate_pose", "template", "TEMPLATE_256", "MIN_FACE_PX", "MAX_YAW_DEG", "MAX_PITCH_DEG",
           "CROP_SIZE", "load_photo"]
