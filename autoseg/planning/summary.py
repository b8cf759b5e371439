"""A short human-readable summary of a plan, for the terminal."""

from __future__ import annotations

from autoseg.fingerprint import Fingerprint
from autoseg.plans import Plans, configuration_names, select_configuration

__all__ = ["format_summary"]


def _x(values: list) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _configuration_lines(p: Plans, default: bool) -> list[str]:
    net = p.network
    mark = " (default)" if default else ""
    extra = f", transformer {net.hidden_size} wide, {net.num_heads} heads, MLP {net.mlp_dim}" if net.hidden_size \
        else f", blocks {net.blocks_per_stage}"
    lines = [
        f"config {p.configuration + mark:<13} {net.architecture}, {len(net.features)} stages, features "
        f"{net.features}{extra}" + (", deep supervision" if net.deep_supervision else ""),
        f"             kernels {[_x(k) for k in net.kernel_sizes]}",
        f"             strides {[_x(s) for s in net.strides]} (total {_x(net.total_stride)})",
    ]
    weights = p.training.dice_class_weights
    if any(w != 1 for w in weights):
        names = [p.labels[k] for k in sorted(p.labels)[1:]]
        lines.append("             Dice class weights " + ", ".join(f"{n} {w:g}" for n, w in zip(names, weights)))
    free = net.architecture == "patch_free"
    if free:
        lines.append(f"             input averaged down {_x(net.upsample_factor)}; full-resolution heads; guidance "
                     f"patch {net.guidance_share:g} of the input per axis; reconstruction loss weight "
                     f"{net.reconstruction_weight:g}")
    for st in p.stages:
        low = f" -> network input {_x([e // f for e, f in zip(st.patch_size, net.upsample_factor)])}" if free else ""
        lines.append(
            f"  {st.name:<10} patch {_x(st.patch_size)}{low} ({100 * st.share_of_median_volume:.0f}% of median "
            "volume), "
            f"batch {st.batch_size}, ~{st.estimated_memory_gib:.2f} GiB and {st.estimated_step_gflops:.0f} GFLOP "
            f"per step; {st.epochs} epochs x {st.iterations_per_epoch} iterations, {st.optimizer} lr "
            f"{st.learning_rate:g} {st.scheduler}" + (f", starts from {st.init_from}" if st.init_from else ""))
    return lines


def format_summary(fp: Fingerprint, p: Plans) -> str:
    """Cases, shapes and spacings, normalisation, the device, every configuration's network and both stages
    with their memory estimates, and which configuration trains by default and why."""
    dev = p.device
    detail = f", {dev.budget_gib:g} GiB ({dev.budget_source})" if dev.kind == "cuda" else \
        f", {dev.cores} cores, {dev.ram_gib:g} GiB RAM"
    device = f"{dev.kind.upper()} {dev.name}{detail}"
    lines = [
        f"dataset      {p.dataset_name}: {fp.n_cases} cases, {len(p.channel_names)} channel(s) "
        f"{', '.join(p.channel_names)}, classes {', '.join(f'{k}={v}' for k, v in p.labels.items() if k)}",
        f"median       shape {_x(fp.median_shape)} at spacing {_x([round(s, 3) for s in fp.median_spacing])} mm "
        "(z, y, x)",
        f"target       spacing {_x(p.target_spacing)} mm -> median shape {_x(p.median_shape_after_resampling)}",
        "normalise    " + "; ".join(f"{n.channel}: " + ("N4 bias field, then " if n.bias_field else "") +
                                    f"{n.scheme}" + (" in non-zero mask" if n.use_mask else "") +
                                    (f", clip [{n.clip[0]:.4g}, {n.clip[1]:.4g}]" if n.clip else "")
                                    for n in p.normalization),
        f"device       {device}; a step may use {p.memory_budget_gib:.2f} GiB"
        + (" (mixed precision)" if p.amp else ""),
        "augment      " + ("in the training process, on its device (torch); data workers only read the regions"
                           if p.training.augmentation.on_device else "in the data workers (batchgenerators)"),
    ]
    for name in configuration_names(p):
        lines += _configuration_lines(select_configuration(p, name), name == p.default_configuration)
    if p.mirroring_note:
        lines.append(f"mirroring    {p.mirroring_note}")
    if p.default_reason:
        lines.append(f"default      {p.default_configuration}: {p.default_reason}")
    for name, why in p.configuration_reasons.items():
        lines.append(f"{'configs' if name == next(iter(p.configuration_reasons)) else '':<13}{name}: {why}")
    lines.append(f"folds        {len(p.folds)} (validation sizes {[len(f.val) for f in p.folds]})")
    return "\n".join(lines)
