package client

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"strings"
)

// Upload streams r into a running box as the file dest (a full path; its
// parents are created by boxrund). The body is streamed, "dest" before
// "file", so a file of any size is never held in memory.
func (c *Client) Upload(ctx context.Context, box, dest string, r io.Reader) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		err := mw.WriteField("dest", dest)
		if err == nil {
			var part io.Writer
			name := dest[strings.LastIndexByte(dest, '/')+1:]
			if part, err = mw.CreateFormFile("file", name); err == nil {
				_, err = io.Copy(part, r)
			}
		}
		if err == nil {
			err = mw.Close()
		}
		pw.CloseWithError(err)
	}()
	req, err := c.request(ctx, "POST", "/v1/boxes/"+seg(box)+"/files/upload", pr, mw.FormDataContentType())
	if err != nil {
		pr.Close()
		return err
	}
	res, err := c.send(req)
	// The writer may still wait on the pipe (an early error answer):
	// release it.
	pr.CloseWithError(errors.New("upload ended"))
	if err != nil {
		return err
	}
	defer res.Body.Close()
	io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	return nil
}

// Download is a file or directory read from a box: a file's raw bytes, or
// a directory as a tar stream (boxrund; entries named relative to the
// directory's parent). The caller closes it.
type Download struct {
	io.ReadCloser
	// Dir is true when the body is a tar stream of a directory.
	Dir bool
	// Size is the file's length, -1 when unknown (a directory).
	Size int64
	// Name is the file name the server suggests.
	Name string
}

// Download opens the file or directory path of a running box for reading.
func (c *Client) Download(ctx context.Context, box, path string) (*Download, error) {
	b, _ := json.Marshal(map[string]string{"path": path})
	req, err := c.request(ctx, "POST", "/v1/boxes/"+seg(box)+"/files/download", strings.NewReader(string(b)), "application/json")
	if err != nil {
		return nil, err
	}
	res, err := c.send(req)
	if err != nil {
		return nil, err
	}
	d := &Download{ReadCloser: res.Body, Size: res.ContentLength}
	if mt, _, err := mime.ParseMediaType(res.Header.Get("Content-Type")); err == nil && mt == "application/x-tar" {
		d.Dir = true
	}
	if _, p, err := mime.ParseMediaType(res.Header.Get("Content-Disposition")); err == nil {
		d.Name = p["filename"]
	}
	return d, nil
}
