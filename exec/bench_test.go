package exec

import (
	"bytes"
	"context"
	"io"
	"testing"
)

func BenchmarkExecTrue(b *testing.B) {
	c := startServer(b, ServerOptions{})
	ctx := context.Background()
	for b.Loop() {
		p, err := c.Start(ctx, Command{Args: []string{"/bin/true"}})
		if err != nil {
			b.Fatal(err)
		}
		if st := p.Wait(nil, nil); st.Code != 0 {
			b.Fatal(st)
		}
	}
}

// BenchmarkStdout measures process output throughput through the mux.
func BenchmarkStdout(b *testing.B) {
	c := startServer(b, ServerOptions{})
	const size = 64 << 20
	b.SetBytes(size)
	for b.Loop() {
		p, err := c.Start(context.Background(), Command{Args: []string{"head", "-c", "67108864", "/dev/zero"}})
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for ev := range p.Events() {
			n += len(ev.Data)
		}
		if n != size {
			b.Fatalf("got %d bytes", n)
		}
	}
}

// BenchmarkCopyOut measures raw tar throughput from the agent, without
// extraction.
func BenchmarkCopyOut(b *testing.B) {
	c := startServer(b, ServerOptions{})
	dir := b.TempDir()
	const size = 64 << 20
	if err := writeFile(dir+"/f", size); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	for b.Loop() {
		if err := c.CopyOut(context.Background(), dir+"/f", io.Discard); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCopyIn measures tar + transfer + extraction to disk.
func BenchmarkCopyIn(b *testing.B) {
	c := startServer(b, ServerOptions{})
	src := b.TempDir()
	const size = 64 << 20
	if err := writeFile(src+"/f", size); err != nil {
		b.Fatal(err)
	}
	var tarball bytes.Buffer
	if err := TarPath(&tarball, src+"/f", ""); err != nil {
		b.Fatal(err)
	}
	dst := b.TempDir()
	b.SetBytes(size)
	for b.Loop() {
		if err := c.CopyIn(context.Background(), dst, bytes.NewReader(tarball.Bytes())); err != nil {
			b.Fatal(err)
		}
	}
}

func writeFile(p string, size int) error {
	return writeFileBytes(p, bytes.Repeat([]byte("boxrun!\n"), size/8))
}
