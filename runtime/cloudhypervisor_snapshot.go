package runtime

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/boxrun/boxrun/errdefs"
	"github.com/boxrun/boxrun/runtime/ch"
)

// The Cloud Hypervisor warm start. A template VM is booted as any other
// (with stand-in disks and shares that its guest never touches before the
// Hello), paused with vm.pause and saved with vm.snapshot into a directory
// of the template: CH writes the VM's configuration (config.json), its
// devices' state (state.json) and its memory (memory-ranges) there.
//
// A VM is restored from it by a fresh cloud-hypervisor in the box's own
// directory, with PUT /vm.restore on a copy of that directory in which
// config.json names the box's own disks and TAP (the other files are
// links to the template's), then vm.resume. The guest's NIC keeps the
// template's MAC in its device state: the agent sets the box's own at the
// Hello, as on QEMU. The sockets CH makes (API,
// hybrid vsock, serial, virtiofsd's) are named relative to CH's working
// directory, so the restored VM's land in the box's directory unchanged.
//
// One trap is particular to CH: a restored virtio-blk device keeps the
// capacity recorded in state.json (the template stand-in's), not its new
// file's, and vm.resize-disk cannot fix it for a read-only disk (it
// truncates the file). So the disks' sizes are part of the template's key:
// the stand-ins have the box's sizes, and a box whose disks differ in size
// gets a template of its own. Memory is restored on demand where CH can
// (see Restore), else by copying all of it; either way each box's pages
// are its own: sharing the template's pages between boxes is QEMU's alone.
//
// Boxes with volumes boot cold on CH: a restored vhost-user-fs device
// waits on an answer that the virtiofsd releases packaged today never
// send (CH's issues #4994, #6931, #8313), so the guest would hang at its
// Hello.

var _ Snapshotter = (*CloudHypervisor)(nil)

// chSnapshotDir is the template's directory as vm.snapshot wrote it.
const chSnapshotDir = "snapshot"

// chTemplateFormat is bumped when what a CH template holds changes meaning.
const chTemplateFormat = 1

// TemplateFiles is the snapshot directory.
func (c *CloudHypervisor) TemplateFiles() []string { return []string{chSnapshotDir} }

// versionKey names the binary and its version (versionOf): an upgrade
// invalidates templates.
func (c *CloudHypervisor) versionKey() (string, error) {
	bin, err := c.BinaryPath()
	if err != nil {
		return "", err
	}
	return versionOf(bin, c.Version)
}

// TemplateKey hashes the VmConfig that cfg makes with every per-VM value
// (paths, TAP, MAC) taken out and the disks' sizes put in, plus CH's
// version.
func (c *CloudHypervisor) TemplateKey(cfg VMConfig) (key, family string, err error) {
	if len(cfg.Volumes) > 0 {
		return "", "", errors.New("cloud-hypervisor cannot restore virtio-fs devices with today's virtiofsd: boxes with volumes boot cold")
	}
	v, err := c.versionKey()
	if err != nil {
		return "", "", err
	}
	tap := ""
	if cfg.Network {
		tap = "tap"
	}
	shape := cfg
	shape.MAC = "mac"
	vc := c.VMConfig(shape, tap)
	vc.Payload.Kernel, vc.Payload.Initramfs = "kernel", "initramfs"
	for i := range vc.Disks {
		st, err := os.Stat(cfg.Disks[i].Path)
		if err != nil {
			return "", "", err
		}
		vc.Disks[i].Path = fmt.Sprintf("disk%d size=%d", i, st.Size())
	}
	b, err := json.Marshal(vc)
	if err != nil {
		return "", "", err
	}
	return shapeHash(fmt.Sprintf("cloud-hypervisor format %d\n%s\n%s\n", chTemplateFormat, v, b)),
		shapeHash("cloud-hypervisor\n" + string(b)), nil
}

// StartTemplate boots cfg as Start does: CH's snapshot copies the memory.
func (c *CloudHypervisor) StartTemplate(ctx context.Context, cfg VMConfig) (VM, error) {
	return c.Start(ctx, cfg)
}

// SaveTemplate pauses the template VM, snapshots it into its dir's
// snapshot directory and shuts it down.
func (c *CloudHypervisor) SaveTemplate(ctx context.Context, vm VM) error {
	v, ok := vm.(*chVM)
	if !ok {
		return errdefs.New(errdefs.RuntimeError, "not a cloud-hypervisor VM")
	}
	defer v.Kill()
	ctx, cancel := context.WithTimeout(ctx, memoryTimeout(v.memoryMB))
	defer cancel()
	tmp := filepath.Join(v.dir, chSnapshotDir+".tmp")
	os.RemoveAll(tmp)
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := v.client.PauseVM(ctx); err != nil {
		return fmt.Errorf("vm.pause: %w", err)
	}
	if err := v.client.Snapshot(ctx, "file://"+absPath(tmp)); err != nil {
		return fmt.Errorf("vm.snapshot: %w", err)
	}
	if err := v.Kill(); err != nil {
		return err
	}
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(tmp, "config.json")); err != nil {
		return fmt.Errorf("vm.snapshot wrote no config.json: %w", err)
	}
	for _, en := range ents {
		if err := syncFile(filepath.Join(tmp, en.Name())); err != nil {
			return err
		}
	}
	return os.Rename(tmp, filepath.Join(v.dir, chSnapshotDir))
}

// Restore starts cfg from the template in dir: a new cloud-hypervisor,
// vm.restore from a copy of the snapshot with the box's own devices, then
// vm.resume. It returns once CH reports the VM running; a snapshot CH
// refuses fails it, leaving nothing behind.
//
// Memory is restored on demand (memory_restore_mode OnDemand, through
// userfaultfd): the guest's pages are read from the template when it first
// touches them, so a restore does not read all of the memory file first,
// and an idle box holds only what it touched. A CH that cannot (no
// userfaultfd for its user) gets the template again in Copy mode, and is
// not asked for OnDemand again once Copy worked.
func (c *CloudHypervisor) Restore(ctx context.Context, cfg VMConfig, dir string) (VM, error) {
	src := filepath.Join(dir, chSnapshotDir)
	if _, err := os.Stat(filepath.Join(src, "config.json")); err != nil {
		return nil, errdefs.Wrap(errdefs.RuntimeError, err, "template")
	}
	bin, _ := c.BinaryPath()
	if _, copyOnly := chCopyOnly.Load(bin); copyOnly {
		vm, _, err := c.restore(ctx, cfg, src, "")
		return vm, err
	}
	vm, refused, err := c.restore(ctx, cfg, src, "OnDemand")
	if !refused || ctx.Err() != nil {
		return vm, err
	}
	vm, _, cerr := c.restore(ctx, cfg, src, "Copy")
	if cerr == nil {
		chCopyOnly.Store(bin, true)
		if cfg.Logger != nil {
			cfg.Logger.Info("cloud-hypervisor cannot restore memory on demand; restoring by copying it", "err", err)
		}
	}
	return vm, cerr
}

// chCopyOnly notes the CH binaries that refused an on-demand restore but
// restored the same template by copying.
var chCopyOnly sync.Map

// restore is one attempt of Restore with memory mode mode ("": CH's
// default); refused says that CH answered vm.restore with an error.
func (c *CloudHypervisor) restore(ctx context.Context, cfg VMConfig, src, mode string) (_ VM, refused bool, _ error) {
	vm, fail, err := c.launch(ctx, cfg)
	if err != nil {
		return nil, false, err
	}
	restore := filepath.Join(cfg.Dir, "restore")
	defer os.RemoveAll(restore)
	if err := restoreDir(src, restore, cfg, vm.tap); err != nil {
		_, err = fail(errdefs.Wrap(errdefs.RuntimeError, err, "restore from template"))
		return nil, false, err
	}
	actx, cancel := context.WithTimeout(ctx, memoryTimeout(cfg.MemoryMB))
	defer cancel()
	rc := &ch.RestoreConfig{SourceURL: "file://" + absPath(restore), MemoryRestoreMode: mode}
	if err := vm.client.Restore(actx, rc); err != nil {
		var ae *ch.APIError
		refused := errors.As(err, &ae)
		if vm.exited() {
			err = vm.exitedErr("at restore")
		} else {
			err = errdefs.Wrap(errdefs.RuntimeError, err, "restore from template")
		}
		_, err = fail(err)
		return nil, refused, err
	}
	vm.connectRelay(ctx, 200*time.Millisecond)
	if err := vm.client.ResumeVM(actx); err != nil {
		_, err = fail(errdefs.Wrap(errdefs.RuntimeError, err, "resume the restored VM"))
		return nil, false, err
	}
	v, err := vm.running(ctx, actx, "restore", fail)
	return v, false, err
}

// restoreDir makes dst a snapshot directory for cfg from the template's
// src: config.json with cfg's disk paths, TAP and MAC, and a link to each
// other file of src. The rest of config.json is kept as CH wrote it
// (fields boxrun does not know included); a config.json whose devices do
// not match cfg's is an error.
func restoreDir(src, dst string, cfg VMConfig, tap string) error {
	os.RemoveAll(dst)
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		return err
	}
	var conf map[string]any
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber() // sizes stay exact
	if err := d.Decode(&conf); err != nil {
		return fmt.Errorf("template config.json: %w", err)
	}
	list := func(key string) []any {
		l, _ := conf[key].([]any)
		return l
	}
	disks, nets, fss := list("disks"), list("net"), list("fs")
	if len(disks) != len(cfg.Disks) || len(fss) != len(cfg.Volumes) || (len(nets) > 0) != (tap != "") {
		return fmt.Errorf("the template has %d disks, %d shares and %d NICs: not the box's shape", len(disks), len(fss), len(nets))
	}
	for i, x := range disks {
		m, ok := x.(map[string]any)
		if !ok {
			return fmt.Errorf("template config.json: disk %d is not an object", i)
		}
		m["path"] = absPath(cfg.Disks[i].Path)
	}
	for i, x := range nets {
		m, ok := x.(map[string]any)
		if !ok {
			return fmt.Errorf("template config.json: net %d is not an object", i)
		}
		m["tap"] = tap
		if cfg.MAC != "" {
			m["mac"] = cfg.MAC
		}
		// CH notes the template's TAP's own MAC here and would set it on
		// the box's TAP: let it read the box's TAP instead.
		delete(m, "host_mac")
	}
	out, err := json.Marshal(conf)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dst, "config.json"), out, 0o600); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, en := range ents {
		if en.Name() == "config.json" {
			continue
		}
		if err := os.Symlink(absPath(filepath.Join(src, en.Name())), filepath.Join(dst, en.Name())); err != nil {
			return err
		}
	}
	return nil
}

// memoryTimeout bounds vm.snapshot and vm.restore, which write and read
// all of a VM's memory: a minute, plus 20 s a GiB (a slow disk's pace).
func memoryTimeout(memoryMB int) time.Duration {
	return time.Minute + time.Duration(memoryMB)*20*time.Second/1024
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
