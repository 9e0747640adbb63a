package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/boxrun/boxrun/boxrund"
	"github.com/boxrun/boxrun/boxrund/client"
)

// aliases is the image catalog of `boxrun images` (spec §6.5), resolved on
// the client as upstream's CLI does; other names pass through.
var aliases = []struct{ Name, Image string }{
	{"default", "ubuntu:24.04"},
	{"ubuntu", "ubuntu:24.04"},
	{"python", "python:3.12-slim"},
	{"node", "node:22-slim"},
	{"golang", "golang:1.22"},
	{"rust", "rust:1.77-slim"},
	{"alpine", "alpine:3.20"},
}

func resolveImage(name string) string {
	for _, al := range aliases {
		if al.Name == name {
			return al.Image
		}
	}
	return name
}

// boxFlags are the flags of create, shell and run.
type boxFlags struct {
	name    string
	cpu     int
	memory  int
	disk    int
	network bool
	volumes []string
	env     []string
	workdir string
	ports   []string
	noPull  bool
}

func (b *boxFlags) add(f *flags, withName bool) {
	if withName {
		f.str(&b.name, "n,name", "", "NAME", "the box's name")
	}
	f.int(&b.cpu, "cpu", 2, "N", "virtual CPUs")
	f.int(&b.memory, "m,memory", 1024, "MB", "memory in MiB")
	f.int(&b.disk, "d,disk", 8, "GB", "disk size in GiB")
	f.bool(&b.network, "network", "give the box a network")
	f.list(&b.volumes, "v,volume", "HOST:GUEST[:ro]", "share a host directory")
	f.list(&b.env, "e,env", "KEY=VALUE", "environment variable")
	if withName {
		f.str(&b.workdir, "w,workdir", "", "DIR", "working directory (default /root)")
		f.list(&b.ports, "p,publish", "HOSTPORT:GUESTPORT", "publish a TCP port on 127.0.0.1 (with --network)")
	}
	f.bool(&b.noPull, "no-pull", "skip the pull step (with its progress bar): the create pulls")
}

func parseEnv(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, usagef("-e wants KEY=VALUE, not %q", kv)
		}
		m[k] = v
	}
	return m, nil
}

// parseVolume reads HOST:GUEST[:ro|:rw]; a relative host path is taken
// from the current directory.
func parseVolume(s string) (client.Volume, error) {
	parts := strings.Split(s, ":")
	v := client.Volume{}
	switch {
	case len(parts) == 3 && (parts[2] == "ro" || parts[2] == "rw"):
		v.ReadOnly = parts[2] == "ro"
	case len(parts) != 2:
		return v, usagef("-v wants HOST:GUEST[:ro|:rw], not %q", s)
	}
	host, err := filepath.Abs(parts[0])
	if err != nil || parts[0] == "" {
		return v, usagef("-v %q: bad host path", s)
	}
	if !strings.HasPrefix(parts[1], "/") {
		return v, usagef("-v %q: the guest path must be absolute", s)
	}
	v.HostPath, v.GuestPath = host, parts[1]
	return v, nil
}

func parsePort(s string) (client.Port, error) {
	h, g, ok := strings.Cut(s, ":")
	hp, err1 := strconv.Atoi(h)
	gp, err2 := strconv.Atoi(g)
	if !ok || err1 != nil || err2 != nil || hp <= 0 || hp > 65535 || gp <= 0 || gp > 65535 {
		return client.Port{}, usagef("-p wants HOSTPORT:GUESTPORT, not %q", s)
	}
	return client.Port{HostPort: hp, GuestPort: gp}, nil
}

func (b *boxFlags) request(image string) (client.CreateRequest, error) {
	req := client.CreateRequest{
		Image: resolveImage(image), Name: b.name, CPU: b.cpu, MemoryMB: b.memory, DiskSizeGB: b.disk,
		Network: b.network, Workdir: b.workdir,
	}
	var err error
	if req.Env, err = parseEnv(b.env); err != nil {
		return req, err
	}
	for _, s := range b.volumes {
		v, err := parseVolume(s)
		if err != nil {
			return req, err
		}
		req.Volumes = append(req.Volumes, v)
	}
	for _, s := range b.ports {
		p, err := parsePort(s)
		if err != nil {
			return req, err
		}
		req.Ports = append(req.Ports, p)
	}
	if b.cpu <= 0 || b.memory <= 0 || b.disk <= 0 {
		return req, usagef("--cpu, --memory and --disk must be positive")
	}
	return req, nil
}

// createBox pulls the image (with a progress bar on a terminal) and
// creates the box.
func (a *app) createBox(ctx context.Context, c *client.Client, req client.CreateRequest, b *boxFlags) (*client.Box, error) {
	if !b.noPull {
		if err := a.pull(ctx, c, req.Image); err != nil {
			return nil, err
		}
	}
	a.box = req.Name
	return c.CreateBox(ctx, req)
}

// createFromArgs creates a box from the IMAGE argument (default
// "default") and the box flags: create's and shell's common path.
func (a *app) createFromArgs(ctx context.Context, pos []string, b *boxFlags) (*client.Client, *client.Box, error) {
	image := "default"
	if len(pos) == 1 {
		image = pos[0]
	}
	req, err := b.request(image)
	if err != nil {
		return nil, nil, err
	}
	c, err := a.connect(ctx)
	if err != nil {
		return nil, nil, err
	}
	box, err := a.createBox(ctx, c, req, b)
	if err != nil {
		return nil, nil, err
	}
	return c, box, nil
}

func cmdCreate(a *app, ctx context.Context, args []string) error {
	var b boxFlags
	var out string
	f := newFlags(a, "create")
	b.add(f, true)
	f.output(&out)
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return usagef("create takes one IMAGE, got %q", pos)
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	_, box, err := a.createFromArgs(ctx, pos, &b)
	if err != nil {
		return err
	}
	if out == "json" {
		return a.writeJSON(box)
	}
	fmt.Fprintln(a.stdout, box.ID)
	if n := box.DisplayName(); n != "" {
		fmt.Fprintf(a.stdout, "Name: %s\n", n)
	}
	fmt.Fprintf(a.stdout, "Status: %s\n", box.Status)
	return nil
}

func cmdLs(a *app, ctx context.Context, args []string) error {
	var status, out string
	var quiet bool
	f := newFlags(a, "ls")
	f.str(&status, "s,status", "", "STATUS", "only boxes of this status (running, stopped, ...)")
	f.bool(&quiet, "q,quiet", "print the ids only")
	f.output(&out)
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("ls takes no arguments")
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	boxes, err := c.ListBoxes(ctx, status)
	if err != nil {
		return err
	}
	switch {
	case out == "json":
		return a.writeJSON(boxes)
	case quiet:
		for _, b := range boxes {
			fmt.Fprintln(a.stdout, b.ID)
		}
		return nil
	case len(boxes) == 0:
		fmt.Fprintln(a.stdout, "No boxes found.")
		return nil
	}
	tw := table(a.stdout)
	fmt.Fprintln(tw, "ID\tNAME\tSTATUS\tIMAGE\tCPU\tMEM\tDISK\tCREATED")
	now := time.Now()
	for _, b := range boxes {
		name := b.DisplayName()
		if name == "" {
			name = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%dMB\t%dGB\t%s\n", b.ID, name, b.Status, b.Image, b.CPU, b.MemoryMB, b.DiskSizeGB, age(b.CreatedAt, now))
	}
	return tw.Flush()
}

// age is how long ago an RFC 3339 stamp was, for people.
func age(stamp string, now time.Time) string {
	t, err := time.Parse(time.RFC3339Nano, stamp)
	if err != nil {
		return stamp
	}
	d := now.Sub(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", max(0, int(d.Seconds())))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

// eachBox runs fn on each box argument; the error of the first failure is
// returned after all were tried.
func (a *app) eachBox(ctx context.Context, cmd string, args []string, setup func(*flags), fn func(c *client.Client, box string) error) error {
	f := newFlags(a, cmd)
	if setup != nil {
		setup(f)
	}
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return usagef("%s needs a BOX", cmd)
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	failed := false
	for _, box := range pos {
		a.box = box
		if err := fn(c, box); err != nil {
			if len(pos) == 1 {
				return err
			}
			a.report(lookup(cmd), err) // and go on with the others
			failed = true
		}
	}
	if failed {
		return exitCode(1)
	}
	return nil
}

func cmdStop(a *app, ctx context.Context, args []string) error {
	return a.eachBox(ctx, "stop", args, nil, func(c *client.Client, box string) error {
		b, err := c.StopBox(ctx, box)
		if err == nil {
			fmt.Fprintf(a.stdout, "Stopped %s\n", b.ID)
		}
		return err
	})
}

func cmdStart(a *app, ctx context.Context, args []string) error {
	return a.eachBox(ctx, "start", args, nil, func(c *client.Client, box string) error {
		b, err := c.StartBox(ctx, box)
		if err == nil {
			fmt.Fprintf(a.stdout, "Started %s\n", b.ID)
		}
		return err
	})
}

func cmdRm(a *app, ctx context.Context, args []string) error {
	var force bool
	return a.eachBox(ctx, "rm", args, func(f *flags) { f.bool(&force, "f,force", "remove running boxes too") },
		func(c *client.Client, box string) error {
			err := c.RemoveBox(ctx, box, force)
			if err == nil {
				fmt.Fprintf(a.stdout, "Removed %s\n", box)
			}
			return err
		})
}

func cmdGC(a *app, ctx context.Context, args []string) error {
	var older int64
	f := newFlags(a, "gc")
	f.int64(&older, "older-than", 3600, "SECS", "remove boxes stopped more than SECS ago")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) > 0 || older < 0 {
		return usagef("gc takes no arguments and a non-negative --older-than")
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	n, err := c.GC(ctx, older)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "Removed %d box(es)\n", n)
	return nil
}

func cmdImages(a *app, ctx context.Context, args []string) error {
	var out string
	f := newFlags(a, "images")
	f.output(&out)
	if _, _, err := a.parseArgs(f, args, -1); err != nil {
		return err
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	if out == "json" {
		type row struct {
			Name  string `json:"name"`
			Image string `json:"image"`
		}
		rows := []row{}
		for _, al := range aliases {
			rows = append(rows, row{al.Name, al.Image})
		}
		return a.writeJSON(rows)
	}
	tw := table(a.stdout)
	fmt.Fprintln(tw, "ALIAS\tIMAGE")
	for _, al := range aliases {
		fmt.Fprintf(tw, "%s\t%s\n", al.Name, al.Image)
	}
	tw.Flush()
	fmt.Fprintln(a.stdout, "\nAny other image reference is used as it is (e.g. docker.io/library/debian:12).")
	return nil
}

func cmdInfo(a *app, ctx context.Context, args []string) error {
	var out string
	f := newFlags(a, "info")
	f.output(&out)
	if _, _, err := a.parseArgs(f, args, -1); err != nil {
		return err
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	in, err := c.Info(ctx)
	if err != nil {
		return err
	}
	if out == "json" {
		return a.writeJSON(in)
	}
	tw := table(a.stdout)
	fmt.Fprintf(tw, "Server:\t%s\n", c.Endpoint())
	if in.Version != "" {
		fmt.Fprintf(tw, "Version:\t%s\n", in.Version)
	}
	if in.Hypervisor != "" {
		fmt.Fprintf(tw, "Hypervisor:\t%s\n", in.Hypervisor)
	}
	fmt.Fprintf(tw, "Running boxes:\t%d\n", in.RunningBoxes)
	fmt.Fprintf(tw, "CPU:\t%d of %d in use\n", in.UsedCPU, in.MaxCPU)
	fmt.Fprintf(tw, "Memory:\t%d of %d MB in use\n", in.UsedMemoryMB, in.MaxMemoryMB)
	return tw.Flush()
}

func cmdVersion(a *app, ctx context.Context, args []string) error {
	f := newFlags(a, "version")
	if _, _, err := a.parseArgs(f, args, -1); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "boxrun %s (go)\n", boxrund.Version)
	// The server's, when one answers; never start one for this.
	if c, err := client.Discover(ctx, client.EnvFrom(a.getenv), 500*time.Millisecond); err == nil {
		if in, err := c.Info(ctx); err == nil && in.Version != "" {
			fmt.Fprintf(a.stdout, "server %s at %s\n", in.Version, c.Endpoint())
		}
	}
	return nil
}

func cmdRun(a *app, ctx context.Context, args []string) error {
	var b boxFlags
	var timeout int
	f := newFlags(a, "run")
	b.add(f, false)
	f.int(&timeout, "t,timeout", 0, "SECS", "kill the command after SECS")
	pos, cmd, err := a.parseArgs(f, args, 1)
	if err != nil {
		return err
	}
	if len(pos) != 1 || len(cmd) == 0 {
		return usagef("run needs an IMAGE and a command")
	}
	if timeout < 0 {
		return usagef("--timeout must be positive")
	}
	creq, err := b.request(pos[0])
	if err != nil {
		return err
	}
	req := client.RunRequest{
		Image: creq.Image, Cmd: cmd, CPU: creq.CPU, MemoryMB: creq.MemoryMB, DiskSizeGB: creq.DiskSizeGB,
		Network: creq.Network, Env: creq.Env, Volumes: creq.Volumes, TimeoutMS: int64(timeout) * 1000,
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	if !b.noPull {
		if err := a.pull(ctx, c, req.Image); err != nil {
			return err
		}
	}
	res, err := c.Run(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprint(a.stdout, res.Stdout)
	fmt.Fprint(a.stderr, res.Stderr)
	code := 1
	if res.ExitCode != nil && *res.ExitCode >= 0 && *res.ExitCode <= 255 {
		code = *res.ExitCode
	}
	if res.ErrorMessage != nil && *res.ErrorMessage != "" {
		fmt.Fprintf(a.stderr, "boxrun: %s\n", *res.ErrorMessage)
		if code == 0 {
			code = 1
		}
	}
	return exitCode(code)
}

// pull pulls an image through the server's pull route, with a progress
// bar on stderr when it is a terminal. A server without the route is
// skipped silently (its create pulls); so is any failure but the image's
// own (IMAGE_PULL_FAILED) and an interrupt: the create then reports it.
func (a *app) pull(ctx context.Context, c *client.Client, image string) error {
	var bar *progressBar
	if a.stderrTTY {
		bar = newProgressBar(a.stderr, image)
	}
	_, err := c.Pull(ctx, image, bar.update)
	bar.finish(err)
	switch {
	case err == nil, errors.Is(err, client.ErrPullUnsupported):
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case client.CodeOf(err) == "IMAGE_PULL_FAILED":
		return err
	}
	return nil
}
