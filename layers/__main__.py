"""``python -m attnzoo.layers``: print every registered attention with its patterns and a one-line summary."""

from attnzoo.layers import PATTERNS, attention_info, list_attention

rows = [attention_info(name) for name in list_attention()]
width = max(len(info.name) for info in rows)
print(f"{'name':<{width}}  {'  '.join(p.replace('_', '-') for p in PATTERNS)}  summary")
for info in rows:
    marks = "  ".join(("yes" if p in info.patterns else "-").center(len(p)) for p in PATTERNS)
    print(f"{info.name:<{width}}  {marks}  {info.summary}")
