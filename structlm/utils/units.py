"""Numbers as people read them in progress lines and summaries."""


def amount(n: float, unit: str) -> str:
    """'12,800 tokens' below a million, '3.4M tokens' from there (never '0.0M tokens')."""
    return f"{n / 1e6:.1f}M {unit}" if n >= 1e6 else f"{int(n):,} {unit}"
