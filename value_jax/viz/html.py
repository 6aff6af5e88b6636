"""One self-contained HTML page per example: opens from disk with no server and no network.

The page embeds the image (base64), the boxes, the tokens and every attention map (float16,
base64, decoded in the page), and draws what the app's "attention from a token" view draws: pick
a map and a head (or the mean over heads), click a word piece or a region, and the boxes on the
image take the token's attention as opacity while the words are coloured by theirs.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np

from value_jax.viz.store import Store

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:sans-serif;margin:12px} .tok{display:inline-block;padding:2px 4px;margin:1px;
cursor:pointer;border:1px solid #ddd;border-radius:3px;font-family:monospace}
.sel{border:2px solid blue} #wrap{position:relative;display:inline-block}
canvas{position:absolute;left:0;top:0} img{display:block;max-width:720px}
.reg{font-size:11px}
</style></head><body>
<h3>__TITLE__</h3>
<div>map <select id="map"></select> head <select id="head"></select>
<span id="note" style="margin-left:10px;color:#a00"></span></div>
<p id="words"></p>
<div id="wrap"><img id="img" alt="image"><canvas id="cv"></canvas></div>
<p id="regions"></p>
<p style="font-size:12px;color:#555">Attention is written query→key; box opacity = weight /
largest region weight; the top 3 regions are outlined and named.</p>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
function f16(b64, shape){const bin=atob(b64);const n=bin.length/2;const out=new Float32Array(n);
 for(let i=0;i<n;i++){const h=bin.charCodeAt(2*i)|(bin.charCodeAt(2*i+1)<<8);
  const s=(h&0x8000)?-1:1, e=(h>>10)&0x1f, f=h&0x3ff;
  out[i]= e===0? s*Math.pow(2,-14)*(f/1024) : (e===31? (f?NaN:s*Infinity) : s*Math.pow(2,e-15)*(1+f/1024));}
 return out;}
const maps={}; for(const [k,v] of Object.entries(D.attention)) maps[k]={...v, a:f16(v.data, v.shape)};
let state={map:D.default_map, head:'0', kind:'text', pos:1};
const mapSel=document.getElementById('map'), headSel=document.getElementById('head');
for(const k of Object.keys(maps)){const o=document.createElement('option');o.value=o.textContent=k;mapSel.appendChild(o);}
for(let h=0;h<D.num_heads;h++){const o=document.createElement('option');o.value=h;o.textContent='head '+(h+1);headSel.appendChild(o);}
{const o=document.createElement('option');o.value='mean';o.textContent='mean over heads';headSel.appendChild(o);}
mapSel.value=state.map; mapSel.onchange=()=>{state.map=mapSel.value;draw();};
headSel.onchange=()=>{state.head=headSel.value;draw();};
function row(){const m=maps[state.map], [H,Q,K]=m.shape, nt=D.tokens.length;
 let q; if(m.query==='joint') q= state.kind==='text'? state.pos : nt+state.pos;
 else if((m.query==='text')===(state.kind==='text')) q=state.pos; else return null;
 const r=new Float32Array(K); const heads= state.head==='mean'? [...Array(H).keys()] : [parseInt(state.head)];
 for(const h of heads) for(let k=0;k<K;k++) r[k]+=m.a[(h*Q+q)*K+k]/heads.length;
 if(m.key==='joint') return {text:r.slice(0,nt), regions:r.slice(nt)};
 return m.key==='text'? {text:r, regions:null} : {text:null, regions:r};}
function draw(){const w=row(); document.getElementById('note').textContent= w? '' :
 'this map has no queries of the selected kind';
 const words=document.getElementById('words'); words.innerHTML='';
 const tmax= w&&w.text? Math.max(...w.text,1e-9):1;
 D.tokens.forEach((t,i)=>{const s=document.createElement('span');s.className='tok'+(state.kind==='text'&&state.pos===i?' sel':'');
  s.textContent=t; const a= w&&w.text? 0.85*w.text[i]/tmax:0; s.style.background='rgba(255,80,0,'+a.toFixed(3)+')';
  s.title= w&&w.text? w.text[i].toFixed(4):''; s.onclick=()=>{state.kind='text';state.pos=i;draw();}; words.appendChild(s);});
 const regs=document.getElementById('regions'); regs.innerHTML='';
 D.regions.forEach((t,i)=>{const s=document.createElement('span');s.className='tok reg'+(state.kind==='region'&&state.pos===i?' sel':'');
  s.textContent=t; s.onclick=()=>{state.kind='region';state.pos=i;draw();}; regs.appendChild(s);});
 const img=document.getElementById('img'), cv=document.getElementById('cv');
 cv.width=img.clientWidth; cv.height=img.clientHeight; const c=cv.getContext('2d');
 const sx=img.clientWidth/D.width, sy=img.clientHeight/D.height; c.clearRect(0,0,cv.width,cv.height);
 if(w&&w.regions){const rmax=Math.max(...w.regions,1e-9);
  const top=[...w.regions.keys()].sort((a,b)=>w.regions[b]-w.regions[a]).slice(0,3);
  D.boxes.forEach((b,i)=>{c.fillStyle='rgba(255,80,0,'+(0.85*w.regions[i]/rmax).toFixed(3)+')';
   c.fillRect(b[0]*sx,b[1]*sy,(b[2]-b[0])*sx,(b[3]-b[1])*sy);});
  top.forEach(i=>{const b=D.boxes[i]; c.strokeStyle='red'; c.lineWidth=2; c.strokeRect(b[0]*sx,b[1]*sy,(b[2]-b[0])*sx,(b[3]-b[1])*sy);
   c.fillStyle='red'; c.fillRect(b[0]*sx,b[1]*sy,c.measureText(D.regions[i]).width+40,14);
   c.fillStyle='white'; c.fillText(D.regions[i]+' '+w.regions[i].toFixed(2),b[0]*sx+2,b[1]*sy+11);});}
 if(state.kind==='region'){const b=D.boxes[state.pos]; c.setLineDash([5,3]); c.strokeStyle='blue';
  c.strokeRect(b[0]*sx,b[1]*sy,(b[2]-b[0])*sx,(b[3]-b[1])*sy); c.setLineDash([]);}}
const img=document.getElementById('img'); img.onload=draw; img.src=D.image || '';
if(!D.image){img.style.width='640px';img.style.height=(640*D.height/Math.max(D.width,1))+'px';img.style.background='#eee';}
window.explorer={state, draw, row};
draw();
</script></body></html>
"""


def page_data(store: Store, example: int, default_map: str | None = None) -> dict:
    rec = store.record(example)
    info = rec["info"]
    image = ""
    if info.get("image") and os.path.isfile(info["image"]):
        ext = os.path.splitext(info["image"])[1].lower().lstrip(".")
        mime = "image/png" if ext == "png" else "image/jpeg"
        with open(info["image"], "rb") as f:
            image = f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")
    attention = {}
    for name, a in rec["attention"].items():
        a16 = np.ascontiguousarray(a, dtype="<f2")
        attention[name] = {
            **store.meta["maps"][name],
            "shape": list(a16.shape),
            "data": base64.b64encode(a16.tobytes()).decode("ascii"),
        }
    if default_map is None:
        from value_jax.viz.views import default_map as pick

        default_map = pick(store)
    return {
        "tokens": rec["tokens"],
        "regions": rec["regions"],
        "boxes": np.asarray(rec["boxes"], float).round(2).tolist(),
        "width": info["width"] or 1,
        "height": info["height"] or 1,
        "image": image,
        "num_heads": store.meta["num_heads"],
        "attention": attention,
        "default_map": default_map,
        "caption": info["caption"],
    }


def write_html(store: Store, example: int, path: str, default_map: str | None = None) -> str:
    """Writes the page of one example to `path` and returns it."""
    data = page_data(store, example, default_map)
    title = f"{store.model_type.upper()} example {example}: {data['caption']}"
    escaped = json.dumps(data).replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", _escape(title)).replace("__DATA__", escaped)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["write_html", "page_data"]
