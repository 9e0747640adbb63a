// Command boxrun is the BoxRun command line: it drives a boxrund server
// over its REST API (Unix socket or TCP) and, as `boxrun serve`, is that
// server. A client command that finds no server starts one.
//
// Run `boxrun help` for the commands; spec/boxrun-api.md §7.4 is the
// contract its flags and output follow.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/boxrun/boxrun/boxrund"
	"github.com/boxrun/boxrun/boxrund/client"
	"github.com/boxrun/boxrun/errdefs"
	"golang.org/x/term"
)

func main() {
	a := &app{
		stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr,
		getenv:    os.Getenv,
		stderrTTY: term.IsTerminal(int(os.Stderr.Fd())),
		term:      func() terminal { return newTTY(os.Stdin, os.Stdout) },
	}
	os.Exit(a.main(os.Args[1:]))
}

// app is one run of the command; its fields are what a test replaces.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	stderrTTY      bool            // show the pull progress bar
	term           func() terminal // attach's local end
	// noAutostart: a client command that finds no server fails instead
	// of starting one (also $BOXRUN_NO_AUTOSTART).
	noAutostart bool

	box string // the box the command is about, for error hints
}

// command is one subcommand.
type command struct {
	name    string
	args    string
	summary string
	run     func(a *app, ctx context.Context, args []string) error
	hidden  bool
	details string // more help, after the summary
}

var commands []*command

func init() {
	commands = []*command{
		{name: "serve", args: "[--host H] [--port P] [--socket PATH] [--data-dir DIR] [--token T]", summary: "run the server (boxrund)", run: cmdServe},
		{name: "create", args: "[IMAGE] [flags]", summary: "create and start a box (IMAGE default: default)", run: cmdCreate},
		{name: "ls", args: "[-s STATUS] [-q] [-o json]", summary: "list boxes", run: cmdLs},
		{name: "stop", args: "BOX...", summary: "stop boxes (disks kept)", run: cmdStop},
		{name: "start", args: "BOX...", summary: "start stopped boxes", run: cmdStart},
		{name: "rm", args: "[-f] BOX...", summary: "remove boxes (-f: also running ones)", run: cmdRm},
		{name: "exec", args: "[-d] [-t SECS] [-e K=V] [-w DIR] BOX -- CMD [ARG...]", summary: "run a command in a box, streaming its output; exits with its code", run: cmdExec},
		{name: "execs", args: "BOX [-o json]", summary: "list a box's execs", run: cmdExecs},
		{name: "logs", args: "EXEC_ID", summary: "replay and follow an exec's output; exits with its code", run: cmdLogs},
		{name: "attach", args: "[--shell PATH] BOX", summary: "open an interactive terminal in a box", run: cmdAttach},
		{name: "shell", args: "[IMAGE] [create flags] [--shell PATH] [--keep]", summary: "create a box and attach to it; removed on exit unless --keep", run: cmdShell},
		{name: "cp", args: "SRC DST", summary: "copy files or directories between a box (BOX:PATH) and here", run: cmdCp, details: cpHelp},
		{name: "run", args: "[flags] IMAGE -- CMD [ARG...]", summary: "run a command in a throwaway box; exits with its code", run: cmdRun},
		{name: "gc", args: "[--older-than SECS]", summary: "remove boxes stopped longer than SECS (3600)", run: cmdGC},
		{name: "images", args: "[-o json]", summary: "list the image aliases", run: cmdImages},
		{name: "info", args: "[-o json]", summary: "show the server's limits and usage", run: cmdInfo},
		{name: "version", args: "", summary: "print the version", run: cmdVersion},
		{name: "completion", args: "bash|zsh|fish", summary: "print a shell completion script", run: cmdCompletion},
		{name: "help", args: "[COMMAND]", summary: "show help", run: cmdHelp},
		{name: "__complete", hidden: true, run: cmdComplete},
	}
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// main runs the command line and returns the exit code.
func (a *app) main(args []string) int {
	if len(args) == 0 {
		a.usage(a.stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help":
		a.usage(a.stdout)
		return 0
	case "-V", "--version":
		args = []string{"version"}
	}
	cmd := lookup(args[0])
	if cmd == nil {
		fmt.Fprintf(a.stderr, "Error: unknown command %q\n\n", args[0])
		a.usage(a.stderr)
		return 2
	}
	if cmd.name == "serve" {
		return boxrund.Main(args[1:], a.stderr)
	}
	// Ctrl-C cancels the request in flight: a create then leaves nothing
	// behind, an exec is canceled.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := cmd.run(a, ctx, args[1:])
	return a.report(cmd, err)
}

// exitCode ends the command with a code and no message (a command's own
// exit code).
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit %d", int(e)) }

// usageError is a command line mistake: the message and the command's
// usage, exit 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// report prints err and returns the exit code: API errors as
// "Error: [CODE] message" with a hint, exit 1.
func (a *app) report(cmd *command, err error) int {
	if err == nil {
		return 0
	}
	var ec exitCode
	if errors.As(err, &ec) {
		return int(ec)
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(a.stderr, "Error: %s\nUsage: boxrun %s %s\n", ue.msg, cmd.name, cmd.args)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintln(a.stderr, "Error: interrupted")
		return 130
	}
	var ae *client.Error
	if errors.As(err, &ae) {
		fmt.Fprintf(a.stderr, "Error: [%s] %s\n", ae.Code, ae.Message)
		if h := hint(ae.Code, a.box); h != "" {
			fmt.Fprintf(a.stderr, "Hint: %s\n", h)
		}
		return 1
	}
	fmt.Fprintf(a.stderr, "Error: %v\n", err)
	return 1
}

// hint is what to do about an error code; box is the box concerned, ""
// when unknown.
func hint(code errdefs.Code, box string) string {
	b := box
	if b == "" {
		b = "<box>"
	}
	switch code {
	case errdefs.BoxNotRunning:
		return fmt.Sprintf("the box is stopped: start it with `boxrun start %s`", b)
	case errdefs.BoxAlreadyRunning:
		return fmt.Sprintf("the box is running: stop it with `boxrun stop %s`, or remove it anyway with `boxrun rm -f %s`", b, b)
	case errdefs.NameAlreadyExists:
		return "pick another name (-n), or remove the other box with `boxrun rm -f NAME`"
	case errdefs.BoxNotFound:
		return "list the boxes with `boxrun ls`"
	case errdefs.ResourceExceeded:
		return "stop a box (`boxrun ls -s running`) or ask for less (--cpu, -m)"
	case errdefs.ImagePullFailed:
		return "check the image name (`boxrun images` lists the aliases) and the registry"
	case "UNAUTHORIZED":
		return "set BOXRUN_TOKEN to the server's token"
	}
	return ""
}

func (a *app) usage(w io.Writer) {
	fmt.Fprintln(w, "boxrun: micro-VM sandboxes (BoxRun API)")
	fmt.Fprintln(w, "\nUsage: boxrun COMMAND [ARGS]")
	fmt.Fprintln(w, "\nCommands:")
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	for _, c := range commands {
		if !c.hidden {
			fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.summary)
		}
	}
	tw.Flush()
	fmt.Fprint(w, `
Environment:
  BOXRUN_HOST, BOXRUN_PORT   server's TCP address (127.0.0.1:9090)
  BOXRUN_STATE_DIR           state dir (~/.boxrun); its boxrun.sock is used when it answers
  BOXRUN_TOKEN               bearer token to send
  BOXRUN_NO_AUTOSTART=1      do not start a server when none answers

Run 'boxrun help COMMAND' for a command's flags.
`)
}

// flags is a command's flag set: flags may come before, between and after
// the positional arguments, "--" ends them, and each flag has a short and
// a long name.
type flags struct {
	fs   *flag.FlagSet
	cmd  string
	help []string
}

func newFlags(a *app, cmd string) *flags {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return &flags{fs: fs, cmd: cmd}
}

func (f *flags) names(names string) []string { return strings.Split(names, ",") }

func (f *flags) doc(names, arg, usage string) {
	var parts []string
	for _, n := range f.names(names) {
		if len(n) == 1 {
			parts = append(parts, "-"+n)
		} else {
			parts = append(parts, "--"+n)
		}
	}
	s := strings.Join(parts, ", ")
	if arg != "" {
		s += " " + arg
	}
	f.help = append(f.help, s+"\t"+usage)
}

func (f *flags) str(p *string, names, def, arg, usage string) {
	for _, n := range f.names(names) {
		f.fs.StringVar(p, n, def, usage)
	}
	f.doc(names, arg, usage)
}

func (f *flags) int(p *int, names string, def int, arg, usage string) {
	for _, n := range f.names(names) {
		f.fs.IntVar(p, n, def, usage)
	}
	if def != 0 {
		usage += fmt.Sprintf(" (default %d)", def)
	}
	f.doc(names, arg, usage)
}

func (f *flags) int64(p *int64, names string, def int64, arg, usage string) {
	for _, n := range f.names(names) {
		f.fs.Int64Var(p, n, def, usage)
	}
	if def != 0 {
		usage += fmt.Sprintf(" (default %d)", def)
	}
	f.doc(names, arg, usage)
}

func (f *flags) bool(p *bool, names, usage string) {
	for _, n := range f.names(names) {
		f.fs.BoolVar(p, n, false, usage)
	}
	f.doc(names, "", usage)
}

type listFlag struct{ p *[]string }

func (l listFlag) String() string     { return "" }
func (l listFlag) Set(s string) error { *l.p = append(*l.p, s); return nil }

func (f *flags) list(p *[]string, names, arg, usage string) {
	for _, n := range f.names(names) {
		f.fs.Var(listFlag{p}, n, usage)
	}
	f.doc(names, arg, usage+" (repeatable)")
}

// output adds -o/--output json|table.
func (f *flags) output(p *string) {
	f.str(p, "o,output", "table", "FORMAT", "table or json")
}

// parse parses args. With maxPos >= 0, the argument after the maxPos-th
// positional one starts the trailing command (flag parsing stops there,
// as after "--"); rest is that command. With maxPos < 0 everything after
// "--" is positional too.
func (f *flags) parse(args []string, maxPos int) (pos, rest []string, err error) {
	for {
		if err := f.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, nil, flag.ErrHelp
			}
			return nil, nil, usageError{strings.TrimPrefix(err.Error(), "flag provided but not defined: ")}
		}
		left := f.fs.Args()
		consumed := len(args) - len(left)
		if consumed > 0 && args[consumed-1] == "--" {
			if maxPos >= 0 {
				return pos, left, nil
			}
			return append(pos, left...), nil, nil
		}
		if len(left) == 0 {
			return pos, nil, nil
		}
		if maxPos >= 0 && len(pos) == maxPos {
			return pos, left, nil
		}
		pos = append(pos, left[0])
		args = left[1:]
	}
}

func (f *flags) usage(w io.Writer, c *command) {
	fmt.Fprintf(w, "Usage: boxrun %s %s\n\n%s\n", c.name, c.args, c.summary)
	if c.details != "" {
		fmt.Fprintf(w, "\n%s", c.details)
	}
	if len(f.help) > 0 {
		fmt.Fprintln(w, "\nFlags:")
		tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
		for _, h := range f.help {
			fmt.Fprintf(tw, "  %s\n", h)
		}
		tw.Flush()
	}
}

// parseArgs parses a command's flags, printing its usage for -h.
func (a *app) parseArgs(f *flags, args []string, maxPos int) (pos, rest []string, err error) {
	pos, rest, err = f.parse(args, maxPos)
	if errors.Is(err, flag.ErrHelp) {
		f.usage(a.stdout, lookup(f.cmd))
	}
	return pos, rest, err
}

// connect finds the server: the socket when it exists and answers, else
// TCP; when none answers it starts one (unless told not to).
func (a *app) connect(ctx context.Context) (*client.Client, error) {
	env := client.EnvFrom(a.getenv)
	c, err := client.Discover(ctx, env, 500*time.Millisecond)
	if err == nil || !errors.Is(err, client.ErrNoServer) {
		return c, err
	}
	if env.Remote || a.noAutostart || a.getenv("BOXRUN_NO_AUTOSTART") != "" {
		return nil, fmt.Errorf("no boxrun server answers on unix:%s or %s (start one with `boxrun serve`)", env.Socket, env.URL())
	}
	return a.autostart(ctx, env)
}

// autostart starts `<this program> serve` in its own session, detached
// from the terminal, its output in <state>/boxrun.log, and waits for it to
// answer (every 0.5 s, up to 30 s).
func (a *app) autostart(ctx context.Context, env client.Env) (*client.Client, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("no server answers, and starting one failed: %w", err)
	}
	if err := os.MkdirAll(env.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("no server answers, and starting one failed: %w", err)
	}
	logPath := filepath.Join(env.StateDir, "boxrun.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("no server answers, and starting one failed: %w", err)
	}
	defer logf.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	cmd := exec.Command(exe, "serve", "--host", env.Host, "--port", strconv.Itoa(env.Port),
		"--data-dir", env.StateDir, "--socket", env.Socket)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("no server answers, and starting one failed: %w", err)
	}
	fmt.Fprintf(a.stderr, "Started a boxrun server (pid %d, log %s)\n", cmd.Process.Pid, logPath)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := client.Discover(ctx, env, 500*time.Millisecond)
		if err == nil {
			return c, nil
		}
		select {
		case werr := <-exited:
			// Another server may have won the race for the socket/port.
			if c, err := client.Discover(ctx, env, 500*time.Millisecond); err == nil {
				return c, nil
			}
			return nil, fmt.Errorf("the server it started exited (%v); its log:\n%s", werr, tail(logPath, 20))
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the server it started (pid %d) did not answer in 30 s; see %s", cmd.Process.Pid, logPath)
		}
	}
}

// tail is the last n lines of a file.
func tail(p string, n int) string {
	b, _ := os.ReadFile(p)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// writeJSON prints v indented, for -o json.
func (a *app) writeJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func checkOutput(o string) error {
	if !slices.Contains([]string{"table", "json"}, o) {
		return usagef("-o must be table or json, not %q", o)
	}
	return nil
}

func table(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 3, ' ', 0) }

func cmdServe(a *app, ctx context.Context, args []string) error {
	return exitCode(boxrund.Main(args, a.stderr))
}

func cmdHelp(a *app, ctx context.Context, args []string) error {
	if len(args) == 0 {
		a.usage(a.stdout)
		return nil
	}
	c := lookup(args[0])
	if c == nil || c.hidden {
		return usagef("unknown command %q", args[0])
	}
	if c.name == "serve" {
		boxrund.Main([]string{"-h"}, a.stdout)
		return nil
	}
	return c.run(a, ctx, []string{"-h"})
}
