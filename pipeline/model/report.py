"""Human-readable training report, printed by `splitexit train` and `splitexit calibrate`."""

from __future__ import annotations

__all__ = ["format_report"]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _epochs(e: dict | None) -> str:
    """Which epoch was kept, and whether training stopped before its schedule's end (older
    metrics have run and best only, or nothing)."""
    if not e:
        return ""
    stop = (f", stopped early at step {e['stopped_at_step']} of {e['scheduled_steps']}"
            if e.get("stopped_early") else "")
    return f", epoch {e['best']} of {e['run']} kept{stop}"


def format_report(m: dict) -> str:
    s, c = m["structure"], m["calibration"]
    lines = [f"model {m['model']}  id {m['model_id']}", "",
             "| side | layer | in->out (a conv: channels) | fan-out | density | stored weights "
             "| MACs/frame |",
             "|---|---|---|---|---|---|---|"]
    for side in ("head", "tail"):
        for r in s[side]:
            kind = " (conv)" if r.get("kind") == "conv" else ""
            lines.append(f"| {'edge' if side == 'head' else 'server'} | {r['junction']}{kind} | "
                         f"{r['n_in']}->{r['n_out']} | {r['fan_out']} | {r['density']:.3f} | "
                         f"{r['weights']} | {r['macs']} |")
    uplink = s.get("uplink_macs", 0)
    if uplink:
        every = s["edge_macs"] - uplink
        average = every + uplink * c["test"]["offload_ratio"]
        macs = (f"{every} MACs on every frame + {uplink} per offloaded frame (the "
                f"bottleneck; {average:.0f} a frame at the test offload)")
    else:
        macs = f"{s['edge_macs']} MACs/frame"
    lines += ["",
              f"edge:   {s['edge_params']} parameters, {macs}, "
              f"artifact {m['artifact_bytes']['edge']} bytes",
              f"server: {s['server_params']} parameters, {s['server_macs']} MACs/frame, "
              f"artifact {m['artifact_bytes']['server']} bytes",
              f"training: {m['train_seconds_per_epoch']:.2f} s/epoch "
              f"({m['train_threads']} threads){_epochs(m.get('train_epochs'))}", "",
              f"threshold {c['threshold']:.4f} on {c['score']} ({c['policy']}, "
              f"chosen on validation)",
              "| split | exit only | full model | split+exit | offload ratio |",
              "|---|---|---|---|---|"]
    for part in ("validation", "test"):
        r = c[part]
        lines.append(f"| {part} | {_pct(r['exit_only'])} | {_pct(r['full'])} | "
                     f"{_pct(r['split_exit'])} | {_pct(r['offload_ratio'])} |")
    for name, q in c.get("confidence", {}).items():  # absent in metrics of older runs
        floor = (f"; a calibrated classifier would show {q['test_ece_floor']:.4f} on as "
                 f"many frames" if "test_ece_floor" in q else "")
        lines.append(f"{name} confidence: ECE {q['test_ece_before']:.4f} on test, "
                     f"{q['test_ece_after']:.4f} at temperature {q['temperature']:.3f} "
                     f"(fitted on validation){floor}")
    if c.get("unfamiliar"):   # absent in metrics of older runs
        lines += _unfamiliar(c["unfamiliar"])
    return "\n".join(lines)


def _unfamiliar(u: dict) -> list[str]:
    """The edge's and tail's unfamiliarity scores: what they flag of the test set, what
    that costs, and how well the edge's separates shifted frames (AUROC, 1 = perfectly)."""
    e, t, test = u["edge"], u["tail"], u["test"]
    shifts = [k for k in ("noise", "inverted", "rot90") if k in u]
    return ["", f"unfamiliar frames: the edge flags {_pct(test['edge_flagged'])} of test "
                f"frames (Mahalanobis, {e['form']} covariance on {e['features']} features, "
                f"{_pct(e['flag_rate'])} of validation), the tail answers "
                f"{_pct(test['unknown'])} `unknown` ({_pct(t['flag_rate'])} of validation); "
                f"split+exit {_pct(test['split_exit'])} with them, offload "
                f"{_pct(test['offload_ratio'])}",
            "| shifted test frames | AUROC of the edge's score | answered by the exit, "
            "before -> now | answered `unknown` |", "|---|---|---|---|",
            *(f"| {k} | {u[k]['auroc']:.3f} | {_pct(u[k]['exit_answered_before'])} -> "
              f"{_pct(u[k]['exit_answered'])} | {_pct(u[k]['unknown'])} |" for k in shifts)]
