package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/runtime"
)

// Config.ImageTemplates: the second create of an image in one shape makes
// the image's template in the background; later boxes are restored from
// it with the box root mounted already, each on a clone of the template's
// box disk. Each is still a box of its own: its disk, random bytes, clock,
// hostname, MAC, CPUs and memory, network. The template's disk is never
// written; Stop/Start keeps the box's own disk; a corrupt image template
// costs that template, never the box.
func TestWarmStartImageTemplate(t *testing.T) {
	if fx.hypervisor == runtime.DriverCloudHypervisor {
		t.Skip("image templates are made on QEMU only (untried on Cloud Hypervisor: none on the machines this was made on)")
	}
	port := hostServer(t, "image says hi")
	ctx := ctxT(t, 8*time.Minute)
	dataDir := filepath.Join(t.TempDir(), "data")
	eng, err := boxrun.New(ctx, boxrun.Config{
		DataDir: dataDir, RegistriesConf: fx.registriesConf, AgentPath: suiteAgent(t),
		Hypervisor: fx.hypervisor, MaxCPU: 64, MaxMemoryMB: 64 << 10,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	spec := boxrun.BoxSpec{Image: fx.ociRef, CPU: 2, MemoryMB: 272, DiskSizeGB: 1, Network: true,
		NetworkPolicy: boxrun.NetworkPolicy{AllowHostPorts: []int{port}}}
	create := func() *boxrun.Box {
		t.Helper()
		b, err := eng.Create(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { eng.Remove(ctx, b.ID, boxrun.Force) })
		return b
	}
	run := func(b *boxrun.Box, script string) string {
		t.Helper()
		res, err := eng.Exec(ctx, b.ID, boxrun.ExecSpec{User: "root", Cmd: []string{"sh", "-c", script}})
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("%s in %s: %v %+v", script, b.ID, err, res)
		}
		return res.Stdout
	}
	// One box of an image makes no image template (nor starts one): only
	// the second does.
	a := create()
	time.Sleep(time.Second)
	builds, _ := filepath.Glob(filepath.Join(dataDir, "cache", "templates", ".build-*"))
	if n := eng.Info().Boots.ImageTemplates; n != 0 || len(builds) != 0 || len(vmmProcesses(dataDir)) != 1 {
		t.Fatalf("after one box of the image: %d image templates, builds %v, VMMs %v", n, builds, vmmProcesses(dataDir))
	}
	run(a, "echo "+a.ID+" > /etc/owner")
	create()
	deadline := time.Now().Add(3 * time.Minute)
	for eng.Info().Boots.ImageTemplates != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("no image template 3 minutes after the second box: boots %+v", eng.Info().Boots)
		}
		time.Sleep(50 * time.Millisecond)
	}
	tpl := imageTemplateDir(t, dataDir)
	tplDisk := filepath.Join(tpl, "data.ext4")
	sumBefore := sparseSum(t, tplDisk)

	before := eng.Info().Boots
	c, d := create(), create()
	after := eng.Info().Boots
	if after.Premounted != before.Premounted+2 || after.Warm != before.Warm+2 || after.Cold != before.Cold {
		t.Fatalf("boots %+v -> %+v: want two boxes restored from the image template", before, after)
	}
	type facts struct{ owner, rnd, uuid, clock, host, mac, cpus, mem, net string }
	probe := func(b *boxrun.Box) facts {
		out := run(b, `
			cat /etc/owner 2>/dev/null || echo none
			head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo
			cat /proc/sys/kernel/random/uuid
			date +%s
			hostname
			cat /sys/class/net/eth0/address
			nproc
			awk '/MemTotal/{print $2}' /proc/meminfo
			wget -qO- http://10.0.2.2:`+strconv.Itoa(port)+`/ ; echo`)
		host := time.Now().Unix()
		l := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if len(l) != 9 {
			t.Fatalf("probe of %s: %q", b.ID, out)
		}
		if clock, _ := strconv.ParseInt(l[3], 10, 64); clock < host-2 || clock > host+2 {
			t.Errorf("%s: clock %s, host %d: more than 2 s apart", b.ID, l[3], host)
		}
		return facts{l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8]}
	}
	fc, fd := probe(c), probe(d)
	t.Logf("box C: %+v", fc)
	t.Logf("box D: %+v", fd)
	// A fresh disk each: nothing of box A's (whose image it is) nor of
	// the template's guest.
	if fc.owner != "none" || fd.owner != "none" {
		t.Errorf("fresh boxes see an owner: C %q, D %q", fc.owner, fd.owner)
	}
	if fc.rnd == fd.rnd || len(fc.rnd) != 64 {
		t.Errorf("/dev/urandom: C %s, D %s", fc.rnd, fd.rnd)
	}
	checkOwnIdentities(t, restoredBox{c, fc.uuid, fc.host, fc.mac, fc.cpus, fc.mem, fc.net},
		restoredBox{d, fd.uuid, fd.host, fd.mac, fd.cpus, fd.mem, fd.net}, "2", 272, "image says hi")
	for _, b := range []*boxrun.Box{c, d} {
		cons, _ := os.ReadFile(filepath.Join(dataDir, "boxes", b.ID, "console.log"))
		for _, want := range []string{`msg="RNG reseeded from the host" bytes=64`, " mounts=0 ", "premounted=true"} {
			if !strings.Contains(string(cons), want) {
				t.Errorf("%s: want %s on the console:\n%s", b.ID, want, cons)
			}
		}
	}
	// Each writes its own disk (synced to it) and
	// sees only its own; the template's disk is left as it was.
	for _, b := range []*boxrun.Box{c, d} {
		run(b, "echo "+b.ID+" > /etc/owner; head -c 8000000 /dev/urandom > /root/big; sync")
	}
	if o := strings.TrimSpace(run(c, "cat /etc/owner")); o != c.ID {
		t.Errorf("C sees owner %q", o)
	}
	if o := strings.TrimSpace(run(d, "cat /etc/owner")); o != d.ID {
		t.Errorf("D sees owner %q", o)
	}
	if sum := sparseSum(t, tplDisk); sum != sumBefore {
		t.Errorf("the image template's disk changed: %s -> %s", sumBefore, sum)
	}
	// Stop/Start: the box boots on its own disk (not a clone again).
	if _, err := eng.Stop(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := eng.Start(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if o := run(c, "cat /etc/owner; wc -c < /root/big"); o != c.ID+"\n8000000\n" {
		t.Errorf("after stop/start, C: %q", o)
	}

	// A corrupt image template: the box is still made, on a fresh disk,
	// and the template goes (the next creates make it again).
	garble(t, filepath.Join(tpl, "state"))
	mid := eng.Info().Boots
	e := create()
	if o := run(e, "cat /etc/owner 2>/dev/null || echo none; touch /etc/x && echo writable"); o != "none\nwritable\n" {
		t.Errorf("box after a corrupt image template: %q", o)
	}
	if got := eng.Info().Boots; got.Premounted != mid.Premounted {
		t.Errorf("boots %+v -> %+v: a box restored from the corrupt image template", mid, got)
	}
	if _, err := os.Stat(tpl); !os.IsNotExist(err) {
		t.Errorf("the corrupt image template is still there: %v", err)
	}

	// The next two boxes of the image make it again; then one whose RAM
	// is zeros (its guest cannot run): whether QEMU fails the restore or
	// the guest its Hello, the box is made, cold or from the shape's
	// template, on a new empty disk.
	create()
	create()
	for deadline := time.Now().Add(3 * time.Minute); eng.Info().Boots.ImageTemplates != 2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the image template was not made again: boots %+v", eng.Info().Boots)
		}
	}
	mid = eng.Info().Boots
	if o := run(create(), "cat /etc/owner 2>/dev/null || echo none"); o != "none\n" {
		t.Errorf("box from the remade image template: %q", o)
	}
	if got := eng.Info().Boots; got.Premounted != mid.Premounted+1 {
		t.Fatalf("boots %+v -> %+v: want the box from the remade image template", mid, got)
	}
	tpl = imageTemplateDir(t, dataDir)
	ram := filepath.Join(tpl, "ram")
	rst, err := os.Stat(ram)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ram, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ram, rst.Size()); err != nil {
		t.Fatal(err)
	}
	mid = eng.Info().Boots
	g := create()
	if o := run(g, "cat /etc/owner 2>/dev/null || echo none; touch /etc/x && echo writable"); o != "none\nwritable\n" {
		t.Errorf("box after an image template of zeros: %q", o)
	}
	got := eng.Info().Boots
	t.Logf("boots after an image template of zeros: %+v -> %+v", mid, got)
	if got.Premounted != mid.Premounted {
		t.Errorf("boots %+v -> %+v: a box counted as restored from the broken image template", mid, got)
	}
	if _, err := os.Stat(tpl); !os.IsNotExist(err) {
		t.Errorf("the broken image template is still there: %v", err)
	}
}

// imageTemplateDir is the one image template (a template with a box
// disk) in eng's cache.
func imageTemplateDir(t *testing.T, dataDir string) string {
	t.Helper()
	all, _ := filepath.Glob(filepath.Join(dataDir, "cache", "templates", "*", "data.ext4"))
	var disks []string
	for _, d := range all {
		if !strings.HasPrefix(filepath.Base(filepath.Dir(d)), ".") { // not a build in progress
			disks = append(disks, d)
		}
	}
	if len(disks) != 1 {
		t.Fatalf("image templates' disks: %v, want one", disks)
	}
	return filepath.Dir(disks[0])
}

// sparseSum hashes a sparse file's data extents and their offsets (a
// clone's holes need not be read).
func sparseSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	h := sha256.New()
	fmt.Fprintf(h, "size %d\n", st.Size())
	fd := int(f.Fd())
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "extent %d\n", data)
		if _, err := io.Copy(h, io.NewSectionReader(f, data, hole-data)); err != nil {
			t.Fatal(err)
		}
		off = hole
	}
	return hex.EncodeToString(h.Sum(nil))
}
