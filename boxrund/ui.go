package boxrund

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"sync"
	"time"
)

// The dashboard (spec §5.3): one page and its script, style and the
// vendored terminal (boxrund/ui/vendor/README.md), embedded at build time so
// that it works offline and matches the server it comes with. The page uses
// only the public API (/v1/...), from the same origin.
//
//go:embed ui/index.html ui/app.css ui/app.js ui/vendor/*.mjs ui/vendor/xterm.css ui/vendor/LICENSE.*
var uiFS embed.FS

type uiAsset struct {
	body  []byte
	ctype string
	etag  string
}

// uiAssets are the embedded files by their path under ui/, read once.
var uiAssets = sync.OnceValue(func() map[string]uiAsset {
	m := map[string]uiAsset{}
	fs.WalkDir(uiFS, "ui", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := uiFS.ReadFile(p)
		if err != nil {
			return err
		}
		ct := mime.TypeByExtension(path.Ext(p))
		switch path.Ext(p) {
		case ".mjs", ".js":
			ct = "text/javascript; charset=utf-8"
		case "":
			ct = "text/plain; charset=utf-8"
		}
		if ct == "" {
			ct = http.DetectContentType(b)
		}
		sum := sha256.Sum256(b)
		m[p[len("ui/"):]] = uiAsset{body: b, ctype: ct, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
		return nil
	})
	return m
})

// uiCSP keeps the page to its own origin: no script but its own files, no
// connection but to this server (HTTP and the attach WebSocket), and no
// framing (its buttons stop and remove boxes). Styles may be inline: the
// terminal writes its own.
const uiCSP = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// ui serves the dashboard page, GET /ui.
func (a *API) ui(w http.ResponseWriter, r *http.Request) error {
	return serveUI(w, r, "index.html")
}

// uiRoutes registers the dashboard's files, /ui/app.js and the like (the
// page itself, /ui, is registered by routes). routes calls it with its
// handle.
func (a *API) uiRoutes(handle func(string, route)) {
	handle("/ui/{file...}", route{"GET": a.uiFile})
}

func (a *API) uiFile(w http.ResponseWriter, r *http.Request) error {
	name := r.PathValue("file")
	if name == "" || name == "index.html" {
		http.Redirect(w, r, "/ui", http.StatusSeeOther)
		return nil
	}
	return serveUI(w, r, name)
}

func serveUI(w http.ResponseWriter, r *http.Request, name string) error {
	f, ok := uiAssets()[name]
	if !ok {
		return newError(http.StatusNotFound, "NOT_FOUND", "no route for %s %s", r.Method, r.URL.Path)
	}
	h := w.Header()
	h.Set("Content-Type", f.ctype)
	// Revalidated on every load (a new binary may bring a new page); the
	// ETag makes that a 304.
	h.Set("Cache-Control", "no-cache")
	h.Set("ETag", f.etag)
	h.Set("X-Content-Type-Options", "nosniff")
	if name == "index.html" {
		h.Set("Content-Security-Policy", uiCSP)
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.body))
	return nil
}
