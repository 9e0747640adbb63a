package boxrund

import (
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestUploadStreams: a 64 MiB upload goes into the box while the server's
// heap stays far below the upload's size (it is streamed, not buffered),
// and arrives intact.
func TestUploadStreams(t *testing.T) {
	const size = 64 << 20
	box := sharedBox(t)
	c := fx.clients["unix"]
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	sum := sha256.New()
	go func() {
		mw.WriteField("dest", "/root/stream.bin")
		fw, _ := mw.CreateFormFile("file", "stream.bin")
		rng := rand.NewChaCha8([32]byte{7})
		buf := make([]byte, 256<<10)
		for n := 0; n < size; n += len(buf) {
			rng.Read(buf)
			sum.Write(buf)
			if _, err := fw.Write(buf); err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.CloseWithError(mw.Close())
	}()
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
		}
	}()
	c.send(t, c.req(t, "POST", "/v1/boxes/"+box.ID+"/files/upload", mw.FormDataContentType(), pr)).want(t, 200)
	close(stop)
	<-sampled
	grew := int64(peak.Load()) - int64(base.HeapInuse)
	t.Logf("64 MiB upload: peak heap %d MiB above the %d MiB before", grew>>20, base.HeapInuse>>20)
	if grew > 24<<20 {
		t.Errorf("heap grew by %d MiB during a 64 MiB upload: it is being buffered", grew>>20)
	}
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("sha256sum", "/root/stream.bin"))
	if err != nil || !strings.HasPrefix(res.Stdout, fmt.Sprintf("%x ", sum.Sum(nil))) {
		t.Errorf("in box: %v %q", err, res.Stdout)
	}
	fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("rm", "/root/stream.bin"))
}

// TestUploadParts: the read deadline moves with every read of the file
// part (a slow upload is not cut off at the idle limit); a destination
// field after the file was written does not change the answer; a file
// part before "dest" is spooled only up to 64 MiB (413 beyond, telling the
// client to send "dest" first).
func TestUploadParts(t *testing.T) {
	box := sharedBox(t)
	c := fx.clients["unix"]
	url := "/v1/boxes/" + box.ID + "/files/upload"

	// A server of its own, with a 1 s idle limit.
	srv, err := Listen(New(fx.eng, Options{UploadIdle: time.Second}), ListenConfig{Socket: filepath.Join(t.TempDir(), "s.sock")})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, srv)
	slow := unixClient(srv.Socket())
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		mw.WriteField("dest", "/root/slow.txt")
		fw, _ := mw.CreateFormFile("file", "slow.txt")
		for i := range 8 { // 8 pauses of 400 ms: twice the idle limit in all
			time.Sleep(400 * time.Millisecond)
			fmt.Fprintf(fw, "chunk %d\n", i)
		}
		pw.CloseWithError(mw.Close())
	}()
	start := time.Now()
	slow.send(t, slow.req(t, "POST", url, mw.FormDataContentType(), pr)).want(t, 200)
	t.Logf("slow upload took %v with an idle limit of 1s", time.Since(start).Round(time.Millisecond))

	var body strings.Builder
	mw = multipart.NewWriter(&body)
	mw.WriteField("dest", "/root/first.txt")
	fw, _ := mw.CreateFormFile("file", "x")
	fw.Write([]byte("data\n"))
	mw.WriteField("dest", "/root/second.txt")
	mw.WriteField("path", "/root/third.txt")
	mw.Close()
	up := c.send(t, c.req(t, "POST", url, mw.FormDataContentType(), strings.NewReader(body.String()))).want(t, 200).object(t)
	if up["dest"] != "/root/first.txt" {
		t.Errorf("upload answered dest %v, the file went to /root/first.txt", up["dest"])
	}
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("sh", "-c", "cat /root/first.txt /root/slow.txt; ls /root/second.txt /root/third.txt 2>/dev/null; rm -f /root/first.txt /root/slow.txt"))
	want := "data\n"
	for i := range 8 {
		want += fmt.Sprintf("chunk %d\n", i)
	}
	if err != nil || res.Stdout != want {
		t.Errorf("in box: %v %q, want %q", err, res.Stdout, want)
	}

	// 64 MiB + 1 before "dest": refused once the spool is full.
	const boundary = "spoolcap"
	big := io.MultiReader(
		strings.NewReader("--"+boundary+"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n\r\n"),
		io.LimitReader(zeros{}, maxSpool+1),
		strings.NewReader("\r\n--"+boundary+"\r\nContent-Disposition: form-data; name=\"dest\"\r\n\r\n/root/big\r\n--"+boundary+"--\r\n"))
	c.send(t, c.req(t, "POST", url, "multipart/form-data; boundary="+boundary, big)).wantError(t, 413, "VALIDATION_ERROR", `send the 'dest' field before 'file'`)
	if st, err := fx.eng.Stat(ctxT(t, time.Minute), box.ID, "/root/big"); err != nil || st.Exists {
		t.Errorf("refused upload: exists %v, err %v", st.Exists, err)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestDownloadSymlink: a symlink is followed inside the box, as the stat
// before the download does (relative, absolute, chained; a directory's
// link comes back as the directory's tar under the link's name), and a
// directory's tar leaves out links that lead out of it.
func TestDownloadSymlink(t *testing.T) {
	box := sharedBox(t)
	c := fx.clients["tcp"]
	script := `set -e; rm -rf /root/sl; mkdir -p /root/sl/d/sub; cd /root/sl; echo target > t.txt
ln -s t.txt rel; ln -s /root/sl/t.txt abs; ln -s rel chain; ln -s nowhere dangling
ln -s loop2 loop1; ln -s loop1 loop2; ln -s / rootlink
echo in > d/f; ln -s f d/ok; ln -s /etc d/abs; ln -s ../../.. d/up; ln -s ../f d/sub/back
ln -s d dlink; ln -s /root/sl/dlink dabs`
	if res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("sh", "-c", script)); err != nil || res.ExitCode != 0 {
		t.Fatalf("setup: %v %+v", err, res)
	}
	for _, name := range []string{"rel", "abs", "chain"} {
		dl := c.download(t, box.ID, "/root/sl/"+name).want(t, 200)
		if string(dl.body) != "target\n" || dl.header.Get("Content-Length") != "7" ||
			!strings.Contains(dl.header.Get("Content-Disposition"), "filename="+name) {
			t.Errorf("%s: %q %v", name, dl.body, dl.header)
		}
	}
	c.download(t, box.ID, "/root/sl/dangling").wantError(t, 400, "RUNTIME_ERROR", "not found")
	if r := c.download(t, box.ID, "/root/sl/loop1"); r.status != 400 && r.status != 422 {
		t.Errorf("symlink loop: %d %s", r.status, r.body)
	}
	c.download(t, box.ID, "/root/sl/rootlink").wantError(t, 422, "VALIDATION_ERROR", "below /")
	for _, tc := range []struct{ path, want string }{
		{"/root/sl/d", "d/,d/f,d/ok,d/sub/,d/sub/back"},
		{"/root/sl/dlink", "dlink/,dlink/f,dlink/ok,dlink/sub/,dlink/sub/back"},
		{"/root/sl/dabs", "dabs/,dabs/f,dabs/ok,dabs/sub/,dabs/sub/back"},
	} {
		tr := c.download(t, box.ID, tc.path).want(t, 200)
		if got := strings.Join(tarNames(t, tr.body), ","); got != tc.want {
			t.Errorf("%s: tar %s, want %s", tc.path, got, tc.want)
		}
	}
	fx.eng.Exec(ctxT(t, time.Minute), box.ID, execSpec("rm", "-rf", "/root/sl"))
}
