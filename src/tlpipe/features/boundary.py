"""Where the base splits in two: the frozen prefix and the layers trained from
`finetune.unfreeze_from` on. The view cache stores the prefix's output (the boundary layer's);
fine-tuning and cached training start after it. Beside backbones.py, and apart from the view cache,
so the models that training builds do not depend on how the cache is built or read.

The param's own checks (a layer of the kept base, not the first one in cached mode) are
config's; here are only the facts known once the base is built (architectures config does not
know by name).
"""

from __future__ import annotations

from tlpipe.runtime.errors import ConfigError


def layer_order(base) -> list[str]:
    """The base's layer names in order, input layer first."""
    return [layer.name for layer in base.layers]


def boundary_layer(base, unfreeze_from: str) -> str:
    """The last frozen layer: the one just before `unfreeze_from` (ConfigError lists valid names)."""
    names = layer_order(base)
    if unfreeze_from not in names[1:]:
        raise ConfigError(f"finetune.unfreeze_from: {base.name} has no layer {unfreeze_from!r}; choose one "
                          f"of: {', '.join(names[1:])}")
    return names[names.index(unfreeze_from) - 1]


def resolve_unfreeze(name: str, base, layer: str | None, unfreeze_from: str) -> str:
    """finetune.unfreeze_from (`auto` or a name) as a layer of `base` (architecture `name`) cut at `layer`:
    auto is the first layer of the last block kept (choices.unfreeze_layer); ConfigError names the keys."""
    from tlpipe.config.choices import unfreeze_layer

    names = layer_order(base)[1:]
    if layer is not None and layer not in names:
        from tlpipe.features.backbones import resolve_layer

        resolve_layer(base, layer)  # its ConfigError lists the valid names
    try:
        return unfreeze_layer(name, layer, unfreeze_from, names) or unfreeze_from
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def prefix_model(base, boundary: str):
    """Preprocessed images -> activations of `boundary` (the frozen part), sharing the base's layers."""
    import keras

    return keras.Model(base.input, base.get_layer(boundary).output, name="prefix")
