"""The report page's stylesheet, inlined into index.html so the page stands alone (no scripts, no
external files)."""

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif; color:var(--fg); }
header { background:#24292f; color:#fff; padding:22px 32px 16px; }
header h1 { margin:0 0 4px; font-size:26px; }
header p { margin:0; color:#d0d7de; }
nav { position:sticky; top:0; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; z-index:1; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-weight:600; }
main { padding:8px 32px 40px; max-width:1500px; }
section { margin-top:26px; }
h2 { font-size:21px; border-bottom:1px solid var(--line); padding-bottom:6px; margin-bottom:10px; }
h3 { font-size:16px; margin:18px 0 8px; }
.intro, .empty { color:var(--muted); margin:4px 0 10px; max-width:70em; }
.notes { background:#fff8c5; border:1px solid #d4a72c; border-radius:6px; padding:8px 14px; margin:14px 0 0; color:#3b2300; }
table.metrics { border-collapse:collapse; margin:6px 0; }
table.metrics th, table.metrics td { border:1px solid var(--line); padding:6px 14px; text-align:right; font-variant-numeric:tabular-nums; }
table.metrics th { background:var(--bg); }
table.metrics td:first-child, table.metrics th:first-child { text-align:left; font-weight:600; }
table.metrics td.best { font-weight:700; background:#dafbe1; }
.gallery { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
figure { margin:0; border:1px solid var(--line); border-radius:6px; padding:8px; background:#fff; max-width:100%; }
figure img { display:block; max-width:100%; height:auto; image-rendering:auto; }
figure.wide { flex-basis:100%; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; max-width:48em; }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:12px; font-weight:600; margin-right:6px; color:#fff; }
.badge.right { background:#1a7f37; } .badge.wrong { background:#cf222e; }
pre { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:12px; overflow:auto; font-size:13px; }
"""
