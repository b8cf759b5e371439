"""What a user sees of training: one line per epoch (console and ``training_log.txt``) and ``progress.png``."""

from __future__ import annotations

from pathlib import Path

from autoseg.atomic import atomic_path

__all__ = ["epoch_line", "append_log", "plot_progress", "progress_png"]


def epoch_line(stage: str, epoch: int, epochs: int, h: dict[str, list[float]], dice: list[float]) -> str:
    """``zoom_in  epoch  3/80  train 0.512  val 0.498  dice 0.81 0.79  ema 0.78  lr 0.00934  12.3 s  data 2%``,
    with ``  skipped N`` at the end when N steps of the epoch were skipped for non-finite gradients."""
    skipped = int(h.get("skipped_steps", [0])[-1])
    return (f"{stage:<8} epoch {epoch:>3}/{epochs:<3} train {h['train_loss'][-1]:.4f}  val {h['val_loss'][-1]:.4f}  "
            f"dice {' '.join(f'{d:.3f}' for d in dice)}  ema {h['ema'][-1]:.3f}  lr {h['lr'][-1]:.2e}  "
            f"{h['epoch_seconds'][-1]:.1f} s  data {100 * h['data_wait_share'][-1]:.0f}%"
            + (f"  skipped {skipped}" if skipped else ""))


def append_log(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def plot_progress(h: dict[str, list[float]], path: Path) -> None:
    """:func:`progress_png` written to ``path``, atomically (nothing before the first epoch)."""
    png = progress_png(h)
    if png is None:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def progress_png(h: dict[str, list[float]], title: str = "") -> bytes | None:
    """Losses, pseudo-Dice (per class, mean and its EMA), learning rate and epoch time against the epoch, a
    dotted line at each stage boundary; None before the first epoch."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(h.get("train_loss", [])) + 1))
    if not epochs:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    ax = axes[0]
    ax.plot(epochs, h["train_loss"], label="train loss")
    ax.plot(epochs, h["val_loss"], label="validation loss")
    ax2 = ax.twinx()
    for c in range(1, 100):
        if f"dice_{c}" not in h:
            break
        ax2.plot(epochs, h[f"dice_{c}"], lw=0.8, alpha=0.6, label=f"pseudo-Dice class {c}")
    ax2.plot(epochs, h["mean_dice"], "g.", label="pseudo-Dice (mean)")
    ax2.plot(epochs, h["ema"], "g-", label="pseudo-Dice (EMA)")
    ax2.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right", fontsize=7)
    for x, (a, b) in enumerate(zip(h["stage"], h["stage"][1:])):
        if a != b:
            for axis in axes:
                axis.axvline(x + 1.5, color="k", ls=":")
    axes[1].plot(epochs, h["lr"])
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, h["epoch_seconds"], label="epoch (s)")
    axes[2].plot(epochs, [s * w for s, w in zip(h["epoch_seconds"], h["data_wait_share"])], label="data wait (s)")
    axes[2].legend()
    axes[2].set_xlabel("epoch (dotted: stage boundary)")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
