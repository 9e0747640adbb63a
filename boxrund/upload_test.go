package boxrund

import (
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"mime/multipart"
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
