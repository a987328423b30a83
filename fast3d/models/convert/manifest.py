"""The released checkpoints' layouts, written down from reading the original code (no released
file could be downloaded where this was written, so none of these tables has been checked
against a real file; the converters fail with a list of every difference if one disagrees).

Each fact names the file and commit it was read from (``SOURCES``). The key/shape functions
re-derive the original modules' ``state_dict()`` from their constructors, by hand:

* :func:`lgm_shapes` - 3DTopia/LGM ``core/models.py`` (``LGM``: ``unet`` + a 1x1 ``conv``) and
  ``core/unet.py`` (``UNet``, ``DownBlock``/``MidBlock``/``UpBlock`` with ``nets``/``attns``
  lists, ``ResnetBlock``, ``MVAttention`` around ``core/attention.py``'s ``MemEffAttention``).
* :func:`openlrm_shapes` / :func:`vfusion3d_shapes` - in ``manifest_lrm`` (the LRMs).
* :func:`era3d_unet_shapes` - in ``manifest_mvdiff`` (Era3D's multi-view diffusion UNet).
* :func:`imagedream_unet_shapes` - in ``manifest_mvdiff`` (ImageDream's ``MultiViewUNetModel`` in
  ashawkey/mvdream_diffusers' diffusers-format release).
"""

from __future__ import annotations

SOURCES = {
    "lgm": ("github.com/3DTopia/LGM", "fe8d12cff8c827df7bb77a3c8e8b37408cb6fe4c"),
    "openlrm": ("github.com/3DTopia/OpenLRM", "3108b6902d27912e1dcdce76970eab51436f5b21"),
    "vfusion3d": ("github.com/facebookresearch/vfusion3d", "a2adcca62226497267aa9a89b2e89b21ff9ef7f7"),
    "era3d": ("github.com/pengHTYX/Era3D", "a2ce68da53c0dc4df403112c53692b9ba893a4f0"),
    "imagedream": ("github.com/ashawkey/mvdream_diffusers", "8b318efac486784819502b88952fae970f40a47d"),
    "imagedream-original": ("github.com/bytedance/ImageDream", "26c3972e586f0c8d2f6c6b297aa9d792d06abebb"),
}

# (fact, value, source file) for LGM; every one is used by the converter or the model
LGM_FACTS = [
    ("released files", "model_fp16_fixrot.safetensors (README's download), model_fp16.safetensors (README's "
     "app.py/infer.py commands); fp16, loaded with load_file + load_state_dict(strict=False)", "readme.md, infer.py"),
    ("state dict", "LGM.state_dict() minus lpips_loss.*: unet.* and conv.* (GaussianRenderer is not an nn.Module)",
     "core/models.py, core/gs.py"),
    ("network", "UNet(9, 14, down/up channels and attention from Options), then self.conv = Conv2d(14, 14, 1) "
     "on its output", "core/models.py"),
    ("U-Net constants", "layers_per_block 2 (up blocks 3), skip_scale sqrt(0.5), GroupNorm 32 groups eps 1e-5, "
     "attention_heads 16, MVAttention num_frames 4, qkv_bias False, proj_bias True", "core/unet.py"),
    ("mid block", "nets[0] (ResnetBlock), then attns[0] (MVAttention), then nets[1]", "core/unet.py MidBlock"),
    ("attention", "qkv Linear(C, 3C) rows [q; k; v], each head-major (reshape B, N, 3, heads, C/heads); proj "
     "Linear(C, C); tokens of all 4 views of a sample attend jointly", "core/attention.py, core/unet.py"),
    ("up-block skips", "layer j concatenates [x, skip] with skip = the last pushed; skip channels out_channels "
     "except the last layer's down_channels[max(-2 - i, -len)]", "core/unet.py UpBlock/UNet"),
    ("input channels", "[ImageNet-normalised RGB (3), Pluecker (o x d, d) (6)], 256 x 256", "infer.py, "
     "core/models.py prepare_default_rays"),
    ("rays", "get_rays: pixel centres (x + 0.5, y + 0.5), focal = h / 2 / tan(fovy / 2), cx = w / 2, OpenGL "
     "camera, unit directions, origin = camera centre", "core/utils.py"),
    ("cameras", "fovy 49.1, cam_radius 1.5; inputs normalised so view 0 has c2w = translate(0, 0, 1.5) (OpenGL, "
     "+Y up); default rig orbit_camera(0, az, 1.5) for az 0, 90, 180, 270 (kiui: az 0 at +Z, 90 at +X)",
     "core/options.py, core/provider_objaverse.py, core/models.py"),
    ("head channels", "pos 0:3, opacity 3:4, scale 4:7, rotation 7:11 (wxyz), rgb 11:14", "core/models.py"),
    ("head activations", "pos clamp(-1, 1); scale 0.1 softplus; opacity sigmoid; rotation F.normalize; rgb "
     "0.5 tanh + 0.5", "core/models.py"),
    ("rotation fix", "before commit 9a0797c rot_act was F.normalize (dim=1 of [B, N, 4]: across Gaussians); "
     "after it F.normalize(x, dim=-1)", "core/models.py, git show 9a0797c"),
    ("rasterizer", "diff_gaussian_rasterization: colors_precomp = rgb, rotations as given (its computeCov3D does "
     "not normalise them), scales as given", "core/gs.py"),
]

# LGM's Options presets (core/options.py): name -> the fields that shape the network
LGM_PRESETS = {
    "big": dict(down_channels=(64, 128, 256, 512, 1024, 1024), down_attention=(False, False, False, True, True, True),
                mid_attention=True, up_channels=(1024, 1024, 512, 256, 128),
                up_attention=(True, True, True, False, False), input_size=256, splat_size=128),
    "small": dict(down_channels=(64, 128, 256, 512, 1024, 1024), down_attention=(False, False, False, True, True, True),
                  mid_attention=True, up_channels=(1024, 1024, 512, 256), up_attention=(True, True, True, False),
                  input_size=256, splat_size=64),
    "tiny": dict(down_channels=(32, 64, 128, 256, 512), down_attention=(False, False, False, False, True),
                 mid_attention=True, up_channels=(512, 256, 128), up_attention=(True, False, False, False),
                 input_size=256, splat_size=64),
}
LGM_IN, LGM_OUT, LGM_LAYERS = 9, 14, 2
# released file name -> the head it was trained with (the rotation fix, LGM_FACTS)
LGM_RELEASES = {"model_fp16_fixrot.safetensors": "original", "model_fp16.safetensors": "original-prefix"}


def _conv(shapes: dict, name: str, cout: int, cin: int, k: int) -> None:
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    shapes[f"{name}.bias"] = (cout,)


def _norm(shapes: dict, name: str, c: int) -> None:
    shapes[f"{name}.weight"] = (c,)
    shapes[f"{name}.bias"] = (c,)


def _resnet(shapes: dict, name: str, cin: int, cout: int) -> None:
    _norm(shapes, f"{name}.norm1", cin)
    _conv(shapes, f"{name}.conv1", cout, cin, 3)
    _norm(shapes, f"{name}.norm2", cout)
    _conv(shapes, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(shapes, f"{name}.shortcut", cout, cin, 1)


def _mvattention(shapes: dict, name: str, c: int) -> None:
    _norm(shapes, f"{name}.norm", c)
    shapes[f"{name}.attn.qkv.weight"] = (3 * c, c)
    shapes[f"{name}.attn.proj.weight"] = (c, c)
    shapes[f"{name}.attn.proj.bias"] = (c,)


def lgm_shapes(opt: dict) -> dict[str, tuple]:
    """Key -> shape of ``LGM(opt).state_dict()`` (LGM's own model, lpips_loss removed as its
    state_dict override does), for the network fields of an Options preset (``LGM_PRESETS``)."""
    down, up = tuple(opt["down_channels"]), tuple(opt["up_channels"])
    s: dict[str, tuple] = {}
    _conv(s, "unet.conv_in", down[0], LGM_IN, 3)
    cout = down[0]
    for i, c in enumerate(down):
        cin, cout = cout, c
        for j in range(LGM_LAYERS):
            _resnet(s, f"unet.down_blocks.{i}.nets.{j}", cin if j == 0 else cout, cout)
            if opt["down_attention"][i]:
                _mvattention(s, f"unet.down_blocks.{i}.attns.{j}", cout)
        if i != len(down) - 1:
            _conv(s, f"unet.down_blocks.{i}.downsample", cout, cout, 3)
    _resnet(s, "unet.mid_block.nets.0", down[-1], down[-1])
    _resnet(s, "unet.mid_block.nets.1", down[-1], down[-1])
    if opt["mid_attention"]:
        _mvattention(s, "unet.mid_block.attns.0", down[-1])
    cout = up[0]
    for i, c in enumerate(up):
        cin, cout = cout, c
        cskip = down[max(-2 - i, -len(down))]
        n = LGM_LAYERS + 1
        for j in range(n):
            _resnet(s, f"unet.up_blocks.{i}.nets.{j}", (cin if j == 0 else cout) + (cskip if j == n - 1 else cout), cout)
            if opt["up_attention"][i]:
                _mvattention(s, f"unet.up_blocks.{i}.attns.{j}", cout)
        if i != len(up) - 1:
            _conv(s, f"unet.up_blocks.{i}.upsample", cout, cout, 3)
    _norm(s, "unet.norm_out", up[-1])
    _conv(s, "unet.conv_out", LGM_OUT, up[-1], 3)
    _conv(s, "conv", LGM_OUT, LGM_OUT, 1)
    return s


def lgm_options_from_state(state: dict) -> dict:
    """The network fields of the Options an LGM state dict was built with, read from its key
    names and shapes (which :func:`lgm_shapes` then checks in full)."""
    def count(prefix: str) -> int:
        n = 0
        while any(k.startswith(f"{prefix}.{n}.") for k in state):
            n += 1
        return n

    def out_channels(key: str) -> int:
        if key not in state or state[key].dim() != 4:
            raise ValueError(f"no 4-d tensor {key!r}")
        return int(state[key].shape[0])

    n_down, n_up = count("unet.down_blocks"), count("unet.up_blocks")
    if n_down == 0 or n_up == 0:
        raise ValueError("no unet.down_blocks.* / unet.up_blocks.* keys")
    return dict(
        down_channels=tuple(out_channels(f"unet.down_blocks.{i}.nets.0.conv1.weight") for i in range(n_down)),
        down_attention=tuple(f"unet.down_blocks.{i}.attns.0.norm.weight" in state for i in range(n_down)),
        mid_attention="unet.mid_block.attns.0.norm.weight" in state,
        up_channels=tuple(out_channels(f"unet.up_blocks.{i}.nets.0.conv1.weight") for i in range(n_up)),
        up_attention=tuple(f"unet.up_blocks.{i}.attns.0.norm.weight" in state for i in range(n_up)))


def lgm_preset_name(opt: dict) -> str | None:
    """The name of the LGM_PRESETS entry with these network fields, or None."""
    keys = ("down_channels", "down_attention", "mid_attention", "up_channels")
    for name, p in LGM_PRESETS.items():
        if all(tuple(p[k]) == tuple(opt[k]) if isinstance(p[k], tuple) else p[k] == opt[k] for k in keys) and \
                tuple(p["up_attention"][:len(p["up_channels"])]) == tuple(opt["up_attention"]):
            return name
    return None
