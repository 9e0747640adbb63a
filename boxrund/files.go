package boxrund

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path"
	"strings"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/errdefs"
)

// runningBox looks a box up for a file transfer: 404 when missing, 400
// BOX_NOT_RUNNING when not running, before any of the body is read.
func (a *API) runningBox(r *http.Request) (*boxrun.Box, error) {
	box, err := a.eng.Get(r.Context(), r.PathValue("box"))
	if err != nil {
		return nil, err
	}
	if box.Status != "running" {
		return nil, errdefs.New(errdefs.BoxNotRunning, "Box is not running")
	}
	return box, nil
}

// maxSpool caps the file part spooled to the host when it arrives before
// its destination. Clients send "dest" first (httpx, curl -F in order, the
// SDK), and then the file is streamed into the box, of any size.
const maxSpool = 64 << 20

// upload serves POST /v1/boxes/{box}/files/upload: multipart with a file
// part "file" and its full destination path "dest" (or "path", as older
// SDKs send). The file is streamed into the box as it arrives (parents
// created); only when "file" comes before "dest" is it spooled to a host
// temp file first, up to maxSpool. Once the file is written, later
// destination fields are ignored: the answer names where it went.
func (a *API) upload(w http.ResponseWriter, r *http.Request) error {
	// Validation, then the lookup, then the box's state.
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err == nil && (mt != "multipart/form-data" || params["boundary"] == "") {
		err = errors.New("no multipart/form-data with a boundary in the Content-Type")
	}
	if err != nil {
		return badRequest("upload must be multipart/form-data with parts 'file' and 'dest': %v", err)
	}
	box, err := a.runningBox(r)
	if err != nil {
		return err
	}
	// The reader reads through idleReader, so every read of the body (the
	// file part too) extends the deadline.
	body := &idleReader{r: r.Body, rc: http.NewResponseController(w), idle: a.opts.UploadIdle}
	mr := multipart.NewReader(body, params["boundary"])
	var dest string
	var spool *os.File
	defer func() {
		if spool != nil {
			spool.Close()
			os.Remove(spool.Name())
		}
	}()
	wrote := false
	for {
		body.extend()
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return badRequest("malformed multipart body: %v", err)
		}
		switch part.FormName() {
		case "dest", "path":
			b, err := io.ReadAll(io.LimitReader(part, 4097))
			if err != nil {
				return badRequest("malformed multipart body: %v", err)
			}
			if len(b) > 4096 {
				return badRequest("dest is longer than 4096 bytes")
			}
			if !wrote && (dest == "" || part.FormName() == "dest") {
				dest = string(b)
			}
		case "file":
			if wrote || spool != nil {
				return badRequest("more than one file part")
			}
			if dest != "" {
				if err := checkDest(dest); err != nil {
					return err
				}
				if err := a.eng.WriteFile(r.Context(), box.ID, dest, part, 0o644); err != nil {
					return uploadError(err)
				}
				wrote = true
				continue
			}
			if spool, err = os.CreateTemp(a.opts.SpoolDir, "boxrund-upload-*"); err != nil {
				return errdefs.Wrap(errdefs.RuntimeError, err, "Failed to upload file")
			}
			n, err := io.Copy(spool, io.LimitReader(part, maxSpool+1))
			if err != nil {
				return badRequest("malformed multipart body: %v", err)
			}
			if n > maxSpool {
				return newError(http.StatusRequestEntityTooLarge, errdefs.ValidationError,
					"the 'file' part came before 'dest' and is larger than %d MiB, the most that is held until 'dest' arrives: send the 'dest' field before 'file' (then the file is streamed, of any size)", maxSpool>>20)
			}
		}
		part.Close()
	}
	switch {
	case dest == "":
		return badRequest("Missing dest field")
	case !wrote && spool == nil:
		return badRequest("Missing file field")
	case spool != nil:
		if err := checkDest(dest); err != nil {
			return err
		}
		if _, err := spool.Seek(0, io.SeekStart); err != nil {
			return errdefs.Wrap(errdefs.RuntimeError, err, "Failed to upload file")
		}
		if err := a.eng.WriteFile(r.Context(), box.ID, dest, spool, 0o644); err != nil {
			return uploadError(err)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"ok": true, "dest": dest})
	return nil
}

func checkDest(dest string) error {
	if !strings.HasPrefix(dest, "/") {
		return badRequest("dest must be an absolute path in the box: %q", dest)
	}
	if strings.HasSuffix(dest, "/") || path.Clean(dest) == "/" {
		return newError(http.StatusBadRequest, errdefs.RuntimeError, "Invalid destination path (no filename): %s", dest)
	}
	return nil
}

func uploadError(err error) error {
	if ae := asAPIError(err); ae.code == string(errdefs.BoxNotRunning) || ae.code == string(errdefs.BoxNotFound) {
		return err
	}
	return errdefs.Wrap(errdefs.RuntimeError, err, "Failed to upload file")
}

// idleReader extends the connection's read deadline before each read.
type idleReader struct {
	r    io.ReadCloser
	rc   *http.ResponseController
	idle time.Duration
}

func (b *idleReader) extend() { b.rc.SetReadDeadline(time.Now().Add(b.idle)) }

func (b *idleReader) Read(p []byte) (int, error) {
	b.extend()
	return b.r.Read(p)
}

func (b *idleReader) Close() error { return b.r.Close() }

type downloadRequest struct {
	Path *string `json:"path"`
}

// download serves POST /v1/boxes/{box}/files/download: a file's raw bytes
// (application/octet-stream, with its length), or, beyond upstream, a
// directory as a tar stream (application/x-tar). Both are streamed.
func (a *API) download(w http.ResponseWriter, r *http.Request) error {
	var req downloadRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	if req.Path == nil || *req.Path == "" {
		return invalid("path is required")
	}
	p := *req.Path
	if !strings.HasPrefix(p, "/") {
		return invalid("path must be absolute in the box: %q", p)
	}
	box, err := a.runningBox(r)
	if err != nil {
		return err
	}
	if path.Clean(p) == "/" {
		return newError(http.StatusBadRequest, errdefs.RuntimeError, "Invalid source path (no filename): %s", p)
	}
	st, err := a.eng.Stat(r.Context(), box.ID, p)
	if err != nil {
		return err
	}
	if !st.Exists {
		return newError(http.StatusBadRequest, errdefs.RuntimeError, "File '%s' not found in box", p)
	}
	name := path.Base(path.Clean(p))
	if st.IsDir {
		w.Header().Set("Content-Type", "application/x-tar")
		w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": name + ".tar"}))
		cw := &countingWriter{w: &deadlineWriter{w: w, rc: http.NewResponseController(w)}}
		if err := a.eng.ReadTar(r.Context(), box.ID, p, cw); err != nil {
			if cw.n == 0 {
				return err
			}
			a.log.Warn("download broke off", "box", box.ID, "path", p, "err", err)
			panic(http.ErrAbortHandler) // the client sees a broken stream, not a short tar
		}
		return nil
	}
	f, err := a.eng.OpenFile(r.Context(), box.ID, p)
	if err != nil {
		return err
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": name}))
	w.Header().Set("Content-Length", fmt.Sprint(f.Size))
	w.WriteHeader(http.StatusOK)
	if n, err := io.Copy(&deadlineWriter{w: w, rc: http.NewResponseController(w)}, f); err != nil || n != f.Size {
		if err == nil {
			err = errors.New("short read")
		}
		a.log.Warn("download broke off", "box", box.ID, "path", p, "err", err)
		panic(http.ErrAbortHandler)
	}
	return nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// deadlineWriter sets the connection's write deadline before each write:
// a client that stops reading a download fails the copy, which ends the
// transfer from the box, instead of pinning the handler.
type deadlineWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	return d.w.Write(p)
}
