package runtime

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// The QEMU warm start: a template VM's RAM is a file mapped shared
// (memory-backend-file, share=on); SaveTemplate stops it and migrates its
// device state into a file with x-ignore-shared, which leaves the RAM out
// (it is in the RAM file already), so saving takes a fraction of a
// second and a few MiB. Restore starts QEMU with the same devices, the RAM
// file mapped private (copy on write) and -incoming from the state file.
// This works under TCG as under KVM, and needs no QEMU newer than 7.2.

var _ Snapshotter = (*QEMU)(nil)

// Files of a QEMU template: the guest's RAM and its device state.
const (
	templateRAM   = "ram"
	templateState = "state"
)

// TemplateFiles are the RAM file and the device state.
func (q *QEMU) TemplateFiles() []string { return []string{templateRAM, templateState} }

// templateFormat is bumped when what a template holds changes meaning.
const templateFormat = 2

// version names QEMU's binary and the first line of its --version, per
// binary and modification time (versionOf): a QEMU upgrade invalidates
// templates.
func (q *QEMU) version() (string, error) {
	bin, err := q.binary()
	if err != nil {
		return "", err
	}
	return versionOf(bin, func() (string, error) {
		out, err := exec.Command(bin, "--version").Output()
		if err != nil {
			return "", fmt.Errorf("%s --version: %w", bin, err)
		}
		return strings.SplitN(string(out), "\n", 2)[0], nil
	})
}

var versions sync.Map // binary path, size, mtime -> its version key

// versionOf returns bin's path, size and modification time with the
// version that get reports, asking get once per such binary: a template
// key that names it changes when the binary does.
func versionOf(bin string, get func() (string, error)) (string, error) {
	st, err := os.Stat(bin)
	if err != nil {
		return "", err
	}
	key := fmt.Sprintf("%s %d %d", bin, st.Size(), st.ModTime().UnixNano())
	if v, ok := versions.Load(key); ok {
		return v.(string), nil
	}
	v, err := get()
	if err != nil {
		return "", err
	}
	v = key + " " + v
	versions.Store(key, v)
	return v, nil
}

// TemplateKey hashes the QEMU command line of cfg with every per-VM value
// (name, paths, MAC) taken out, plus QEMU's version.
func (q *QEMU) TemplateKey(cfg VMConfig) (key, family string, err error) {
	v, err := q.version()
	if err != nil {
		return "", "", err
	}
	shape := cfg
	shape.ID, shape.Dir, shape.MAC, shape.Logger = "template", "", "", nil
	shape.Kernel, shape.Initramfs = "kernel", "initramfs"
	// The read-only disks' sizes count: the template's guest probed
	// stand-ins of these sizes at boot (boxrun.bootdisks) and a restored
	// guest keeps the capacity it read then. A writable disk's does not:
	// Restore makes QEMU signal its capacity (block_resize), which a
	// read-only disk refuses.
	shape.Disks = append([]Disk(nil), cfg.Disks...)
	for i, d := range shape.Disks {
		shape.Disks[i].Path = fmt.Sprintf("disk%d", i)
		if d.ReadOnly {
			st, err := os.Stat(d.Path)
			if err != nil {
				return "", "", err
			}
			shape.Disks[i].Path += fmt.Sprintf(" size=%d", st.Size())
		}
	}
	shape.Volumes = append([]Volume(nil), cfg.Volumes...)
	for i := range shape.Volumes {
		shape.Volumes[i].HostPath = fmt.Sprintf("vol%d", i)
	}
	shape.memFile, shape.memShared, shape.incoming = templateRAM, false, nil
	args := fmt.Sprintf("%q", q.Args(shape))
	return shapeHash(fmt.Sprintf("qemu format %d\n%s\n%s\n", templateFormat, v, args)), shapeHash("qemu\n" + args), nil
}

// shapeHash is a short hash of a template's description.
func shapeHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:12])
}

// StartTemplate boots cfg with its RAM in cfg.Dir/ram, shared.
func (q *QEMU) StartTemplate(ctx context.Context, cfg VMConfig) (VM, error) {
	cfg.memFile, cfg.memShared = filepath.Join(cfg.Dir, templateRAM), true
	os.Remove(cfg.memFile)
	return q.Start(ctx, cfg)
}

// SaveTemplate stops the template VM, migrates its device state to
// dir/state and kills it.
func (q *QEMU) SaveTemplate(ctx context.Context, vm VM) error {
	v, ok := vm.(*qemuVM)
	if !ok {
		return errdefs.New(errdefs.RuntimeError, "not a QEMU VM")
	}
	defer v.Kill()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c, err := dialQMP(ctx, v.dir)
	if err != nil {
		return err
	}
	defer c.close()
	tmp := filepath.Join(v.dir, templateState+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	defer f.Close()
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	for _, step := range []struct {
		cmd  string
		args any
		fd   bool
	}{
		{"stop", nil, false},
		{"migrate-set-capabilities", caps, false},
		{"getfd", map[string]any{"fdname": "snapshot"}, true},
		{"migrate", map[string]any{"uri": "fd:snapshot"}, false},
	} {
		var fd *os.File
		if step.fd {
			fd = f
		}
		if _, err := c.execute(step.cmd, step.args, fd); err != nil {
			return err
		}
	}
	err = poll(ctx, func() (bool, error) {
		st, desc, err := c.migration()
		switch {
		case err != nil:
			return false, err
		case st == "completed":
			return true, nil
		case st == "failed" || st == "cancelled":
			return false, fmt.Errorf("saving the template: migration %s: %s", st, desc)
		}
		return false, nil
	})
	if err != nil {
		return err
	}
	if err := v.Kill(); err != nil {
		return err
	}
	// The RAM file was written through the shared mapping: make both it
	// and the state durable before the template counts as made.
	for _, p := range []string{filepath.Join(v.dir, templateRAM), tmp} {
		if err := syncFile(p); err != nil {
			return err
		}
	}
	return os.Rename(tmp, filepath.Join(v.dir, templateState))
}

func syncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Restore starts cfg from the template in dir and waits until the guest
// runs. A template that cannot be loaded fails Restore (QEMU exits), and
// leaves nothing behind.
func (q *QEMU) Restore(ctx context.Context, cfg VMConfig, dir string) (VM, error) {
	state, err := os.Open(filepath.Join(dir, templateState))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "template")
	}
	defer state.Close()
	// Both files by descriptor, opened together: a template removed and
	// made again meanwhile cannot give QEMU the state of one build and
	// the RAM of another.
	ram, err := os.Open(filepath.Join(dir, templateRAM))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "template")
	}
	defer ram.Close()
	cfg.memFile, cfg.memShared, cfg.incoming, cfg.incomingRAM = "/proc/self/fd/4", false, state, ram
	vm, err := q.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	v := vm.(*qemuVM)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	go func() { // a QEMU that exits (a template it cannot load) ends the wait
		select {
		case <-v.done:
			cancel()
		case <-wctx.Done():
		}
	}()
	err = func() error {
		c, err := dialQMP(wctx, v.dir)
		if err != nil {
			return err
		}
		defer c.close()
		caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
		if _, err := c.execute("migrate-set-capabilities", caps, nil); err != nil {
			return err
		}
		// fd 3 is the state file (Start passes cfg.incoming as fd 3).
		if _, err := c.execute("migrate-incoming", map[string]any{"uri": "fd:3"}, nil); err != nil {
			return err
		}
		return poll(wctx, func() (bool, error) {
			if v.exited() {
				return false, fmt.Errorf("qemu exited")
			}
			st, err := c.status()
			switch {
			case err != nil:
				return false, err
			case st == "paused" || st == "postmigrate":
				// Loaded. The template was saved stopped, so the
				// guest stays paused until told to run. Its guest
				// bound the template's stand-in disks at boot: a
				// resize to the box disk's own size (the same
				// size: nothing changes on the host) makes QEMU
				// signal the guest the capacity it must now read.
				for i, d := range cfg.Disks {
					if d.ReadOnly {
						continue
					}
					st, err := os.Stat(d.Path)
					if err != nil {
						return false, err
					}
					args := map[string]any{"node-name": fmt.Sprintf("disk%d", i), "size": st.Size()}
					if _, err := c.execute("block_resize", args, nil); err != nil {
						return false, fmt.Errorf("disk %d: %w", i, err)
					}
				}
				_, err := c.execute("cont", nil, nil)
				return err == nil, err
			case st == "inmigrate":
				return false, nil
			case st == "shutdown" || st == "internal-error" || st == "guest-panicked" || st == "io-error":
				return false, fmt.Errorf("the restored VM is %s", st)
			}
			return st == "running", nil
		})
	}()
	if err != nil {
		v.Kill()
		<-v.done
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "restore from template: %s",
			strings.TrimSpace(tail(filepath.Join(cfg.Dir, "qemu.log"), 1024)))
	}
	return vm, nil
}
