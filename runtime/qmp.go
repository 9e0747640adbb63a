package runtime

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// qmp is a QEMU Machine Protocol connection: one command at a time, events
// skipped. It is all the warm start needs (stop, migrate, query); the
// agent, not QMP, does everything inside the guest.
type qmp struct {
	conn *net.UnixConn
	r    *bufio.Reader
}

// qmpSocket is the QMP socket in a VM's dir.
const qmpSocket = "qmp.sock"

// dialQMP connects to the QMP socket in dir and negotiates capabilities.
func dialQMP(ctx context.Context, dir string) (*qmp, error) {
	path, release := dirRelative(dir, qmpSocket)
	defer release()
	var d net.Dialer
	var c net.Conn
	var err error
	for {
		// QEMU may make its QMP socket after the agent's, which Start
		// waits for.
		if c, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) || ctx.Err() != nil {
			return nil, fmt.Errorf("qmp: %w", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	q := &qmp{conn: c.(*net.UnixConn), r: bufio.NewReaderSize(c, 64<<10)}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := q.r.ReadBytes('\n'); err != nil { // the greeting
		c.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	if _, err := q.execute("qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) close() error { return q.conn.Close() }

// execute runs a command and returns its "return" value. fd, when set,
// travels with the command (SCM_RIGHTS), as getfd wants it.
func (q *qmp) execute(cmd string, args any, fd *os.File) (json.RawMessage, error) {
	msg := map[string]any{"execute": cmd}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return nil, err
	}
	if fd != nil {
		_, _, err = q.conn.WriteMsgUnix(b, unix.UnixRights(int(fd.Fd())), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class, Desc string
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("qmp %s: bad answer %q", cmd, line)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("qmp %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		default:
			return resp.Return, nil
		}
	}
}

// status returns the VM's run state ("running", "paused", "inmigrate",
// "postmigrate", ...).
func (q *qmp) status() (string, error) {
	ret, err := q.execute("query-status", nil, nil)
	if err != nil {
		return "", err
	}
	var st struct{ Status string }
	err = json.Unmarshal(ret, &st)
	return st.Status, err
}

// migration returns the state of the last migration ("active",
// "completed", "failed", ...) and its error.
func (q *qmp) migration() (string, string, error) {
	ret, err := q.execute("query-migrate", nil, nil)
	if err != nil {
		return "", "", err
	}
	var st struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	err = json.Unmarshal(ret, &st)
	return st.Status, st.ErrorDesc, err
}

// poll calls cond every few milliseconds until it is done or fails, or
// ctx ends.
func poll(ctx context.Context, cond func() (bool, error)) error {
	for {
		done, err := cond()
		if err != nil || done {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}
