"""How the bench scripts name the files they write: relative to the checkout when inside it, so that the logs
committed beside the results name no machine's directories."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown(path: Path) -> Path:
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


RESULTS = ROOT / "bench" / "results"


def write_results(report: dict, out: Path | None, stem: str, device_name: str) -> Path:
    """Write a bench's report as JSON to `out`, or to bench/results/<stem>-<device>.json (the device's name in
    lower case, spaces as dashes), and say where."""
    path = Path(out) if out else RESULTS / f"{stem}-{device_name.replace(' ', '-').lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {shown(path)}")
    return path
