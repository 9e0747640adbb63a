package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/boxrun/boxrun/boxrund/client"
	"golang.org/x/sys/unix"
)

func cmdExec(a *app, ctx context.Context, args []string) error {
	var detach bool
	var timeout int
	var env []string
	var workdir string
	f := newFlags(a, "exec")
	f.bool(&detach, "d,detach", "start it and print the exec id")
	f.int(&timeout, "t,timeout", 0, "SECS", "kill the command after SECS")
	f.list(&env, "e,env", "KEY=VALUE", "environment variable")
	f.str(&workdir, "w,workdir", "", "DIR", "working directory (default the box's)")
	pos, cmd, err := a.parseArgs(f, args, 1)
	if err != nil {
		return err
	}
	if len(pos) != 1 || len(cmd) == 0 {
		return usagef("exec needs a BOX and a command")
	}
	if timeout < 0 {
		return usagef("--timeout must be positive")
	}
	envm, err := parseEnv(env)
	if err != nil {
		return err
	}
	a.box = pos[0]
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	x, err := c.StartExec(ctx, pos[0], client.ExecRequest{Cmd: cmd, Env: envm, Workdir: workdir, TimeoutMS: int64(timeout) * 1000})
	if err != nil {
		return err
	}
	if detach {
		fmt.Fprintln(a.stdout, x.ID)
		return nil
	}
	return a.follow(ctx, c, x.ID, true)
}

func cmdLogs(a *app, ctx context.Context, args []string) error {
	f := newFlags(a, "logs")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("logs needs an EXEC_ID")
	}
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	return a.follow(ctx, c, pos[0], false)
}

// follow streams an exec's output to stdout and stderr in the order it was
// produced and ends with its exit code. An interrupt cancels the exec when
// cancel is set (it was started by this command).
func (a *app) follow(ctx context.Context, c *client.Client, id string, cancel bool) error {
	st, err := c.Wait(ctx, id, a.stdout, a.stderr)
	if err != nil {
		if ctx.Err() != nil {
			if cancel {
				cctx, done := context.WithTimeout(context.Background(), 10*time.Second)
				defer done()
				c.CancelExec(cctx, id)
				fmt.Fprintf(a.stderr, "Interrupted: exec %s canceled\n", id)
			} else {
				fmt.Fprintf(a.stderr, "Interrupted: exec %s goes on\n", id)
			}
			return exitCode(130)
		}
		if errors.Is(err, client.ErrStreamEnded) {
			return errors.New("Connection to server lost")
		}
		return err
	}
	code, msg := exitOf(st)
	if msg != "" {
		fmt.Fprintf(a.stderr, "boxrun: %s\n", msg)
	}
	return exitCode(code)
}

// exitOf is the process exit code for how an exec ended, and what to say
// about an abnormal end: the command's own code (0-255); 124 for a
// timeout without one, 128+N for a signal, 1 for a cancel or a runtime
// error.
func exitOf(st *client.ExitStatus) (int, string) {
	code := -1
	if st.ExitCode != nil {
		code = *st.ExitCode
	}
	switch {
	case st.TimedOut:
		if code <= 0 || code > 255 {
			code = 124
		}
		return code, "[TIMEOUT] the command timed out"
	case st.ExitCode == nil:
		return 1, "[CANCELED] the exec was canceled"
	case st.Signal != "":
		n := 9
		if s := unix.SignalNum(st.Signal); s != 0 {
			n = int(s)
		}
		return 128 + n, "the command was killed by " + st.Signal
	case st.Error != "":
		if code <= 0 || code > 255 {
			code = 1
		}
		return code, "[RUNTIME_ERROR] " + st.Error
	case code < 0 || code > 255:
		return 1, fmt.Sprintf("the command ended with status %d", code)
	}
	return code, ""
}

func cmdExecs(a *app, ctx context.Context, args []string) error {
	var out string
	f := newFlags(a, "execs")
	f.output(&out)
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("execs needs a BOX")
	}
	if err := checkOutput(out); err != nil {
		return err
	}
	a.box = pos[0]
	c, err := a.connect(ctx)
	if err != nil {
		return err
	}
	xs, err := c.ListExecs(ctx, pos[0])
	if err != nil {
		return err
	}
	if out == "json" {
		return a.writeJSON(xs)
	}
	if len(xs) == 0 {
		fmt.Fprintln(a.stdout, "No execs found.")
		return nil
	}
	tw := table(a.stdout)
	fmt.Fprintln(tw, "ID\tSTATUS\tEXIT\tCREATED\tCOMMAND")
	now := time.Now()
	for _, x := range xs {
		exit := "-"
		if x.ExitCode != nil {
			exit = fmt.Sprint(*x.ExitCode)
		}
		cmd := strings.Join(x.Cmd, " ")
		if len(cmd) > 60 {
			cmd = cmd[:57] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", x.ID, x.Status, exit, age(x.CreatedAt, now), cmd)
	}
	return tw.Flush()
}
