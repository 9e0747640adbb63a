package boxrund

import "net/http"

// uiPage is a placeholder until the dashboard lands: it says where the API
// is and lists the boxes, with no script from outside.
const uiPage = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>boxrun</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:left}</style></head>
<body><h1>boxrun</h1><p id="info">API: <code>/v1/info</code>, <code>/v1/boxes</code></p>
<table><thead><tr><th>ID</th><th>Name</th><th>Status</th><th>Image</th></tr></thead><tbody id="boxes"></tbody></table>
<script>
async function refresh(){
  try{
    const boxes=await (await fetch('/v1/boxes')).json();
    const tb=document.getElementById('boxes');tb.textContent='';
    for(const b of boxes){const tr=tb.insertRow();for(const v of [b.id,b.name||'',b.status,b.image]){tr.insertCell().textContent=v}}
  }catch(e){document.getElementById('info').textContent='server unreachable'}
}
refresh();setInterval(refresh,3000);
</script></body></html>
`

func (a *API) ui(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.Write([]byte(uiPage))
	return nil
}
