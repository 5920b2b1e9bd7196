"""Training-only networks: the multi-scale patch discriminator and the optional VGG19 perceptual loss.

Neither is exported or needed at run time, so they live in the trainer, not the engine.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError

LEAK = 0.2


def init_weights(model: nn.Module) -> nn.Module:
    """Training initialisation of a fresh `Marionette`'s encoders and heads (E_app, E_mot, E_lip, E_pose,
    E_eye, E_exp, E_aud): Kaiming-normal weights (fan-in, LeakyReLU 0.2) and zero biases for every Conv2d /
    Linear. G keeps the engine's own initialisation (its zero-initialised flow / head layers make a fresh G
    copy the source; Kaiming inside G moved motion transfer earlier but collapsed 1 of 12 short runs).

    Why: with PyTorch's default init (kaiming-uniform with a = sqrt(5), variance 1/(3 fan_in)) the signal
    shrinks ~3x per layer, and after E_mot's 10 convolutions the unified motion feature varies ~1e-5 across
    inputs (measured: batch std 6e-6 tiny, 2e-5 lite): every frame gives the same z and nothing trains
    (the eye-swap InfoNCE sat at log 2). With this init the batch std is ~0.2."""
    for name in ("e_app", "e_mot", "e_lip", "e_pose", "e_eye", "e_exp", "e_aud"):
        sub = getattr(model, name, None)
        if sub is None:
            continue
        for mod in sub.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight, a=LEAK, mode="fan_in", nonlinearity="leaky_relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
    return model


class PatchDiscriminator(nn.Module):
    """One scale of the discriminator: stride-2 convs (spectral norm) -> 1-channel patch logits.

    (B,3,S,S) in [-1,1] -> (features: list of (B,C_i,S/2^i,S/2^i), logits (B,1,h,w))."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, cin = [], 3
        for c in channels:
            layers.append(nn.Sequential(sn(nn.Conv2d(cin, c, 4, stride=2, padding=1)), nn.LeakyReLU(LEAK)))
            cin = c
        self.body = nn.ModuleList(layers)
        self.out = sn(nn.Conv2d(cin, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats = []
        for layer in self.body:
            x = layer(x)
            feats.append(x)
        return feats, self.out(x)


class Discriminator(nn.Module):
    """Multi-scale patch discriminator (pix2pixHD-style; PD-FGC follows [6] with a StyleGAN2 D, ours is a
    patch D sized to our generator). `forward(img)` -> (features of all scales, logits per scale)."""

    def __init__(self, image_size: int, base: int = 32, scales: int = 2, max_ch: int = 256):
        super().__init__()
        n_layers = 3 if image_size <= 64 else 4
        chans = tuple(min(max_ch, base * 2 ** i) for i in range(n_layers))
        self.scales = nn.ModuleList(PatchDiscriminator(chans) for _ in range(scales))

    @staticmethod
    def for_model(model_name: str, image_size: int) -> "Discriminator":
        base = {"tiny": 8, "lite": 32, "base": 64}.get(model_name, 32)
        return Discriminator(image_size, base=base)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats, logits = [], []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            f, lg = d(x)
            feats += f
            logits.append(lg)
        return feats, logits


# ------------------------------------------------------------------------------------------ VGG19
# torchvision's vgg19().features layout: (conv, relu) x2, pool, x2, pool, x4, pool, x4, pool, x4
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
_VGG_TAPS = (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1 (indices into `features`)
_VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # pix2pixHD / PD-FGC Eq. 7 layer weights


class VGG19Perceptual(nn.Module):
    """VGG19 perceptual loss (PD-FGC Eq. 7) with user-supplied ImageNet weights; never downloads.

    `path`: a .safetensors file holding torchvision's `vgg19` weights (keys "features.N.weight/bias"
    or "N.weight/bias"; classifier keys are ignored). Convert a torchvision checkpoint once with
    `safetensors.torch.save_file({k: v for k, v in vgg19(weights=...).state_dict().items()}, "vgg19.safetensors")`.
    """

    def __init__(self, path: Path):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers[: _VGG_TAPS[-1] + 1])
        self._load(Path(path))
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(f"VGG19 weights file not found: {path}")
        if path.suffix != ".safetensors":
            raise InputError(f"VGG19 weights must be a .safetensors file (no pickle), got {path.name}")
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
            raise InputError(f"cannot read VGG19 weights {path}: {e}") from None
        own = self.features.state_dict()
        fixed = {}
        for k in own:
            for cand in (f"features.{k}", k):
                if cand in state:
                    fixed[k] = state[cand]
                    break
            else:
                raise InputError(f"{path}: missing VGG19 tensor features.{k} (expected torchvision vgg19 keys)")
            if tuple(fixed[k].shape) != tuple(own[k].shape):
                raise InputError(f"{path}: tensor features.{k} has shape {tuple(fixed[k].shape)}, "
                                 f"VGG19 needs {tuple(own[k].shape)}")
        self.features.load_state_dict({k: v.float() for k, v in fixed.items()})

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> sum_i w_i * L1(phi_i(fake), phi_i(real))."""
        x = torch.cat([fake, real]).float()
        x = ((x + 1) * 0.5 - self.mean) / self.std
        loss, k = x.new_zeros(()), 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG_TAPS:
                f, r = x.chunk(2)
                loss = loss + _VGG_WEIGHTS[k] * (f - r.detach()).abs().mean()
                k += 1
        return loss
