"""How the bench scripts name the files they write: relative to the checkout when inside it, so that the logs
committed beside the results name no machine's directories."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown(path: Path) -> Path:
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
