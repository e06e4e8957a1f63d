"""Progress bars and the one-line epoch summary of the trainer's phases (tqdm, optional)."""
from __future__ import annotations

from typing import Any


def _summary_line(rec: dict[str, Any], total: int) -> str:
    s = (f"epoch {rec['epoch']:>3}/{total} {rec['phase']:<8} lr {rec['lr']:.4f}  "
         f"train loss {rec['train_loss']:.4f} acc {100 * rec['train_acc']:.2f}%  "
         f"test loss {rec['test_loss']:.4f} acc {100 * rec['test_acc']:.2f}%")
    if "ds_test_acc" in rec:
        s += f" (DS fwd {100 * rec['ds_test_acc']:.2f}%)"
    if "violation" in rec:
        s += "  viol " + ",".join(f"{v:.3f}" for v in rec["violation"])
    return s + f"  [{rec['epoch_time_s']:.1f}s]"


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def _bar_update(bar, loss: float, acc: float, seen: int, seconds: float) -> None:
    if bar is None:
        return
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%",
                    img_s=f"{seen / seconds:.0f}" if seconds > 0 else "-", refresh=False)


def _bar_step(bar) -> None:
    if bar is not None:
        bar.update(1)


def _bar_close(bar) -> None:
    if bar is not None:
        bar.close()
