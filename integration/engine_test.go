package integration

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

func TestCreateFromRegistry(t *testing.T) {
	box := sharedBox(t)
	if !strings.HasPrefix(box.ID, "box_") || len(box.ID) != 16 {
		t.Fatalf("box id %q", box.ID)
	}
	if box.Status != "running" || box.StartedAt == nil {
		t.Fatalf("box %+v", box)
	}
	res := sh(t, box, "cat /proc/1/comm; uname -r; test -x /bin/busybox && echo busybox")
	if !strings.Contains(res.Stdout, "busybox") {
		t.Fatalf("stdout %q", res.Stdout)
	}
	got, err := fx.eng.Get(context.Background(), box.ID)
	if err != nil || got.ID != box.ID {
		t.Fatalf("get: %+v %v", got, err)
	}
}

func TestCreateFromOCILayoutWithImageUser(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: fx.ociRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	res := sh(t, box, "id -u; id -un; pwd; echo $HOME")
	want := "1000\napp\n/home/app\n/home/app\n"
	if res.Stdout != want {
		t.Fatalf("image user/workdir: got %q want %q (stderr %q)", res.Stdout, want, res.Stderr)
	}
}

func TestExecOutputAndExitCodes(t *testing.T) {
	box := sharedBox(t)
	for _, code := range []int{0, 1, 42} {
		res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{
			Cmd: []string{"sh", "-c", "echo hi; echo oops >&2; exit " + strconv.Itoa(code)},
		})
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode != code || res.Stdout != "hi\n" || res.Stderr != "oops\n" {
			t.Fatalf("exit %d: got %+v", code, res)
		}
	}
	// argv is passed verbatim: no shell splits or expands it.
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"echo", "a  b", "$HOME", "*"}})
	if err != nil || res.Stdout != "a  b $HOME *\n" {
		t.Fatalf("argv: %q %v", res.Stdout, err)
	}
}

func TestExecEnvLayers(t *testing.T) {
	box := sharedBox(t)
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{
		Cmd: []string{"sh", "-c", `echo "$IMAGE_VAR|$BOX_VAR|$EXEC_VAR|$OVERRIDE|$PATH"`},
		Env: map[string]string{"EXEC_VAR": "from-exec", "OVERRIDE": "exec"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := "from-image|from-box|from-exec|exec|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
	if res.Stdout != want {
		t.Fatalf("env: got %q want %q", res.Stdout, want)
	}
}

func TestExecWorkdir(t *testing.T) {
	box := sharedBox(t)
	sh(t, box, "mkdir -p /srv/work")
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"pwd"}, Workdir: "/srv/work"})
	if err != nil || res.Stdout != "/srv/work\n" {
		t.Fatalf("workdir: %q %v", res.Stdout, err)
	}
	_, err = fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"pwd"}, Workdir: "/does/not/exist"})
	if boxrun.CodeOf(err) != boxrun.RuntimeError || !strings.Contains(err.Error(), "/does/not/exist") {
		t.Fatalf("missing workdir: %v", err)
	}
}

func TestExecCommandNotFound(t *testing.T) {
	box := sharedBox(t)
	start := time.Now()
	_, err := fx.eng.Exec(ctxT(t, 30*time.Second), box.ID, boxrun.ExecSpec{Cmd: []string{"no-such-command"}})
	if err == nil || boxrun.CodeOf(err) != boxrun.RuntimeError || !strings.Contains(err.Error(), "no-such-command") {
		t.Fatalf("want RUNTIME_ERROR naming the command, got %v", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatalf("not-found took %v", time.Since(start))
	}
}

func TestStreamOrder(t *testing.T) {
	box := sharedBox(t)
	events, err := fx.eng.Stream(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
		"for i in 1 2 3; do echo out$i; sleep 0.1; echo err$i >&2; sleep 0.1; done; exit 7"}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	exits := 0
	next := 0
	for ev := range events {
		if ev.Seq != next {
			t.Fatalf("seq %d, want %d", ev.Seq, next)
		}
		next++
		if exits > 0 {
			t.Fatalf("event after exit: %+v", ev)
		}
		switch ev.Type {
		case "log":
			got = append(got, ev.Stream+":"+strings.TrimSpace(ev.Data))
		case "exit":
			exits++
			if ev.ExitCode != 7 {
				t.Fatalf("exit code %d", ev.ExitCode)
			}
		default:
			t.Fatalf("event type %q", ev.Type)
		}
	}
	want := "stdout:out1 stderr:err1 stdout:out2 stderr:err2 stdout:out3 stderr:err3"
	if strings.Join(got, " ") != want || exits != 1 {
		t.Fatalf("stream: %v (exits %d), want %s", got, exits, want)
	}
}

// A program that prints the first byte of a UTF-8 character (or binary
// data that looks like one) and then waits for the other side must get
// that byte out: the engine holds such a tail back for the rest of the
// character only briefly, not until the program prints again.
func TestStreamHeldBackTailIsSent(t *testing.T) {
	box := sharedBox(t)
	ctx := ctxT(t, 2*time.Minute)
	flag := "/tmp/held-tail-" + strconv.FormatInt(time.Now().UnixNano(), 10)
	events, err := fx.eng.Stream(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sh", "-c",
		`printf '\303'; while [ ! -e ` + flag + ` ]; do sleep 0.05; done; printf '\251!'`}})
	if err != nil {
		t.Fatal(err)
	}
	var first boxrun.Event
	select {
	case first = <-events:
	case <-time.After(30 * time.Second):
		t.Fatal("the lone byte is still held back after 30 s")
	}
	if first.Type != "log" || first.Data != "\xc3" {
		t.Fatalf("first event %+v, want the lone byte 0xc3", first)
	}
	// Only now does the program go on.
	if res, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"touch", flag}}); err != nil || res.ExitCode != 0 {
		t.Fatalf("touch: %+v %v", res, err)
	}
	out := first.Data
	for ev := range events {
		if ev.Type == "log" {
			out += ev.Data
		}
	}
	if out != "é!" {
		t.Errorf("stdout %q, want %q", out, "é!")
	}
	sh(t, box, "rm -f "+flag)
}

func TestExecTimeoutKillsProcessGroup(t *testing.T) {
	box := sharedBox(t)
	start := time.Now()
	res, err := fx.eng.Exec(ctxT(t, time.Minute), box.ID, boxrun.ExecSpec{
		Cmd:     []string{"sh", "-c", "sleep 1000 & echo started; sleep 1000"},
		Timeout: 2 * time.Second,
	})
	took := time.Since(start)
	if boxrun.CodeOf(err) != boxrun.Timeout {
		t.Fatalf("want TIMEOUT, got %v", err)
	}
	if res == nil || !res.TimedOut || res.Stdout != "started\n" {
		t.Fatalf("result %+v", res)
	}
	if took > 10*time.Second {
		t.Fatalf("timeout of 2s took %v", took)
	}
	// The background sleep was in the same process group: it must be gone.
	left := sh(t, box, "ps -o pid,args | grep 'sleep 1000' | grep -v grep || true")
	if strings.TrimSpace(left.Stdout) != "" {
		t.Fatalf("processes survived the timeout:\n%s", left.Stdout)
	}
}

func TestExecCancelKillsGuestProcess(t *testing.T) {
	box := sharedBox(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(time.Second); cancel() }()
	_, err := fx.eng.Exec(ctx, box.ID, boxrun.ExecSpec{Cmd: []string{"sleep", "999"}})
	if boxrun.CodeOf(err) != boxrun.Canceled {
		t.Fatalf("want CANCELED, got %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := sh(t, box, "ps -o args | grep '^sleep 999' || true")
		if strings.TrimSpace(left.Stdout) == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("canceled process still runs: %s", left.Stdout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestCopyLargeFileBothWays(t *testing.T) {
	box := sharedBox(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "random.bin")
	data := make([]byte, 20<<20)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o640); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	ctx := ctxT(t, 2*time.Minute)
	if err := fx.eng.Copy(ctx, src, box.ID+":/root/random.bin"); err != nil {
		t.Fatal(err)
	}
	res := sh(t, box, "sha256sum /root/random.bin; stat -c %a /root/random.bin")
	if !strings.HasPrefix(res.Stdout, hex.EncodeToString(want[:])) || !strings.HasSuffix(res.Stdout, "640\n") {
		t.Fatalf("in box: %q, want %x", res.Stdout, want)
	}
	back := filepath.Join(dir, "back.bin")
	if err := fx.eng.Copy(ctx, box.ID+":/root/random.bin", back); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != want {
		t.Fatalf("copied back %d bytes with another sha256", len(got))
	}
}

func TestCopyDirectoryTree(t *testing.T) {
	box := sharedBox(t)
	src := filepath.Join(t.TempDir(), "tree")
	os.MkdirAll(filepath.Join(src, "sub", "deep"), 0o750)
	os.WriteFile(filepath.Join(src, "run.sh"), []byte("#!/bin/sh\necho ran\n"), 0o755)
	os.WriteFile(filepath.Join(src, "sub", "deep", "data.txt"), []byte("deep data\n"), 0o600)
	os.Symlink("sub/deep/data.txt", filepath.Join(src, "link"))
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	os.Chtimes(filepath.Join(src, "run.sh"), mtime, mtime)

	ctx := ctxT(t, time.Minute)
	sh(t, box, "mkdir -p /root/dst")
	if err := fx.eng.Copy(ctx, src, box.ID+":/root/dst"); err != nil { // existing dir: lands inside
		t.Fatal(err)
	}
	res := sh(t, box, "cd /root/dst/tree && ./run.sh && readlink link && cat link && stat -c '%a %Y' run.sh sub/deep/data.txt sub")
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 6 || lines[0] != "ran" || lines[1] != "sub/deep/data.txt" || lines[2] != "deep data" ||
		lines[3] != "755 1577934245" || !strings.HasPrefix(lines[4], "600 ") || !strings.HasPrefix(lines[5], "750 ") {
		t.Fatalf("tree in box:\n%s (stderr %s)", res.Stdout, res.Stderr)
	}

	// And back out, to a new host path.
	sh(t, box, "ln -s /etc/passwd /root/dst/tree/abs-link; chmod 700 /root/dst/tree/sub")
	out := filepath.Join(t.TempDir(), "out")
	if err := fx.eng.Copy(ctx, box.ID+":/root/dst/tree", out); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "sub", "deep", "data.txt")); string(b) != "deep data\n" {
		t.Fatalf("data.txt: %q", b)
	}
	if l, _ := os.Readlink(filepath.Join(out, "link")); l != "sub/deep/data.txt" {
		t.Fatalf("link: %q", l)
	}
	// A symlink from the box is copied as a symlink, never followed on the host.
	if l, _ := os.Readlink(filepath.Join(out, "abs-link")); l != "/etc/passwd" {
		t.Fatalf("abs-link: %q", l)
	}
	st, _ := os.Stat(filepath.Join(out, "run.sh"))
	if st == nil || st.Mode().Perm() != 0o755 || !st.ModTime().Equal(mtime) {
		t.Fatalf("run.sh: %v", st)
	}
	if st, _ := os.Stat(filepath.Join(out, "sub")); st == nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("sub mode: %v", st)
	}
}

func TestBoxesDoNotSeeEachOthersWrites(t *testing.T) {
	a := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	b := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	sh(t, a, "echo mine > /etc/marker; rm /bin/vi; sync")
	res := sh(t, b, "cat /etc/marker 2>&1; test -e /bin/vi && echo vi-present")
	if strings.Contains(res.Stdout, "mine") || !strings.Contains(res.Stdout, "vi-present") {
		t.Fatalf("box b sees box a's writes: %q", res.Stdout)
	}
	if res := sh(t, a, "cat /etc/marker"); res.Stdout != "mine\n" {
		t.Fatalf("box a lost its write: %q", res.Stdout)
	}
}

func TestRemoveLeavesNothing(t *testing.T) {
	box := newBox(t, boxrun.BoxSpec{Image: "docker://" + fx.regRef, CPU: 1, MemoryMB: 256, DiskSizeGB: 1})
	dir := filepath.Join(fx.dataDir, "boxes", box.ID)
	if _, err := os.Stat(filepath.Join(dir, "disk.ext4")); err != nil {
		t.Fatalf("box disk missing while running: %v", err)
	}
	pids := vmmProcesses(dir)
	if len(pids) != 1 {
		t.Fatalf("want one VMM process for the box, got %v", pids)
	}
	if err := fx.eng.Remove(context.Background(), box.ID); boxrun.CodeOf(err) != boxrun.BoxAlreadyRunning {
		t.Fatalf("remove running box without force: %v", err)
	}
	if err := fx.eng.Remove(context.Background(), box.ID, boxrun.Force); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pids[0], 0); err == nil {
		t.Fatalf("VMM pid %d still alive after Remove", pids[0])
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("box dir left behind: %v", err)
	}
	if _, err := fx.eng.Get(context.Background(), box.ID); boxrun.CodeOf(err) != boxrun.BoxNotFound {
		t.Fatalf("get after remove: %v", err)
	}
}

func TestFailedCreateLeavesNothing(t *testing.T) {
	before := listDir(t, filepath.Join(fx.dataDir, "boxes"))
	boxesBefore, _ := fx.eng.List(context.Background())

	_, err := fx.eng.Create(ctxT(t, time.Minute), boxrun.BoxSpec{Image: "docker://127.0.0.1:1/library/nope:latest"})
	if boxrun.CodeOf(err) != boxrun.ImagePullFailed || !strings.Contains(err.Error(), "127.0.0.1:1/library/nope") {
		t.Fatalf("bad image: %v", err)
	}

	// A second engine on its own data dir with a kernel that does not exist.
	dataDir := t.TempDir()
	eng, err := boxrun.New(context.Background(), boxrun.Config{DataDir: dataDir, Kernel: "/nonexistent/vmlinuz"})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	_, err = eng.Create(ctxT(t, 2*time.Minute), boxrun.BoxSpec{Image: fx.ociRef, DiskSizeGB: 1})
	if boxrun.CodeOf(err) != boxrun.RuntimeError || !strings.Contains(err.Error(), "/nonexistent/vmlinuz") {
		t.Fatalf("bad kernel: %v", err)
	}
	if got := listDir(t, filepath.Join(dataDir, "boxes")); len(got) != 0 {
		t.Fatalf("bad kernel left boxes behind: %v", got)
	}
	if l, _ := eng.List(context.Background()); len(l) != 0 {
		t.Fatalf("bad kernel left records: %v", l)
	}
	if left := vmmProcesses(dataDir); len(left) != 0 {
		t.Fatalf("bad kernel left VMMs: %v", left)
	}

	after := listDir(t, filepath.Join(fx.dataDir, "boxes"))
	boxesAfter, _ := fx.eng.List(context.Background())
	if strings.Join(after, ",") != strings.Join(before, ",") || len(boxesAfter) != len(boxesBefore) {
		t.Fatalf("bad image left something: dirs %v -> %v, boxes %d -> %d", before, after, len(boxesBefore), len(boxesAfter))
	}
}

func TestBadInputIsTyped(t *testing.T) {
	ctx := context.Background()
	for _, spec := range []boxrun.BoxSpec{
		{Image: fx.ociRef, CPU: -1},
		{Image: fx.ociRef, MemoryMB: -512},
		{Image: fx.ociRef, DiskSizeGB: -1},
		{Image: fx.ociRef, Workdir: "relative"},
		{Image: ""},
	} {
		if _, err := fx.eng.Create(ctx, spec); boxrun.CodeOf(err) != boxrun.ValidationError {
			t.Errorf("create %+v: want VALIDATION_ERROR, got %v", spec, err)
		}
	}
	box := sharedBox(t)
	for _, spec := range []boxrun.ExecSpec{
		{Cmd: nil},
		{Cmd: []string{}},
		{Cmd: []string{"pwd"}, Workdir: "relative"},
		{Cmd: []string{"pwd"}, Timeout: -time.Second},
	} {
		if _, err := fx.eng.Exec(ctx, box.ID, spec); boxrun.CodeOf(err) != boxrun.ValidationError {
			t.Errorf("exec %+v: want VALIDATION_ERROR, got %v", spec, err)
		}
	}
	if _, err := fx.eng.Exec(ctx, "box_nonexistent", boxrun.ExecSpec{Cmd: []string{"true"}}); boxrun.CodeOf(err) != boxrun.BoxNotFound {
		t.Errorf("exec on unknown box: %v", err)
	}
	if _, err := fx.eng.Get(ctx, "box_nonexistent"); boxrun.CodeOf(err) != boxrun.BoxNotFound {
		t.Errorf("get unknown box: %v", err)
	}
	if err := fx.eng.Copy(ctx, "/etc/hostname", "box_nonexistent:/root/x"); boxrun.CodeOf(err) != boxrun.BoxNotFound {
		t.Errorf("copy to unknown box: %v", err)
	}
	if err := fx.eng.Copy(ctx, "/etc/hostname", "/tmp/x"); boxrun.CodeOf(err) != boxrun.ValidationError {
		t.Errorf("copy host to host: %v", err)
	}
}

func listDir(t *testing.T, dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}
