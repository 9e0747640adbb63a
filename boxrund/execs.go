package boxrund

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/boxrun/boxrun"
	"github.com/boxrun/boxrun/errdefs"
)

type execRequest struct {
	Cmd       *[]string         `json:"cmd"`
	Env       map[string]string `json:"env"`
	Workdir   *string           `json:"workdir"`
	TimeoutMS *int64            `json:"timeout_ms"`
}

func (x *execRequest) spec() (boxrun.ExecSpec, error) {
	var s boxrun.ExecSpec
	if x.Cmd == nil || len(*x.Cmd) == 0 || (*x.Cmd)[0] == "" {
		return s, invalid("cmd must be a non-empty list")
	}
	s.Cmd, s.Env = *x.Cmd, x.Env
	if x.Workdir != nil {
		if !strings.HasPrefix(*x.Workdir, "/") {
			return s, invalid("workdir must be an absolute path (starting with /)")
		}
		s.Workdir = *x.Workdir
	}
	if x.TimeoutMS != nil {
		if *x.TimeoutMS <= 0 {
			return s, invalid("timeout_ms must be positive")
		}
		if *x.TimeoutMS > maxTimeoutMS {
			return s, invalid("timeout_ms must be at most %d (30 days)", maxTimeoutMS)
		}
		s.Timeout = time.Duration(*x.TimeoutMS) * time.Millisecond
	}
	return s, nil
}

// startExec serves POST /v1/boxes/{box}/exec: the command starts and runs
// on its own; the answer (201) comes at once.
func (a *API) startExec(w http.ResponseWriter, r *http.Request) error {
	var req execRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	spec, err := req.spec()
	if err != nil {
		return err
	}
	x, err := a.eng.StartExec(r.Context(), r.PathValue("box"), spec)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, execOf(x))
	return nil
}

func (a *API) listExecs(w http.ResponseWriter, r *http.Request) error {
	xs, err := a.eng.ListExecs(r.Context(), r.PathValue("box"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, execsOf(xs))
	return nil
}

// getExec serves GET /v1/boxes/{box}/exec/{id}; as upstream, the box
// segment is not consulted (exec ids are unique).
func (a *API) getExec(w http.ResponseWriter, r *http.Request) error {
	x, err := a.eng.GetExec(r.Context(), r.PathValue("seg"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, execOf(x))
	return nil
}

// execAction serves POST /v1/boxes/{box}/exec/{id}:cancel.
func (a *API) execAction(w http.ResponseWriter, r *http.Request) error {
	id, verb, ok := lastColon(r.PathValue("seg"))
	if !ok {
		return badRequest("Missing action (expected :cancel)")
	}
	if verb != "cancel" {
		return badRequest("Unknown action: %s", verb)
	}
	x, err := a.eng.CancelExec(r.Context(), id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, execOf(x))
	return nil
}

type runRequest struct {
	createRequest
	Cmd       *[]string `json:"cmd"`
	TimeoutMS *int64    `json:"timeout_ms"`
}

// run serves POST /v1/run: create, exec, remove (also on error or when the
// client leaves). Errors before the command started are error answers;
// once it ran, the answer is 200 with what it wrote: exit_code is the exit
// event's (-1 when there was none, as when it was canceled before it
// ended), and, beyond upstream, error_message says why a command ended
// abnormally (timeout, signal, cancel, runtime error).
func (a *API) run(w http.ResponseWriter, r *http.Request) error {
	var req runRequest
	if err := decode(w, r, &req, false); err != nil {
		return err
	}
	req.Workdir, req.Name = nil, nil // upstream: unnamed, workdir /root
	box, err := req.createRequest.spec()
	if err != nil {
		return err
	}
	xr := execRequest{Cmd: req.Cmd, Env: req.Env, TimeoutMS: req.TimeoutMS}
	cmd, err := xr.spec()
	if err != nil {
		return err
	}
	res, err := a.eng.Run(r.Context(), box, cmd)
	if res == nil {
		return err // it did not start
	}
	out := runJSON{Stdout: res.Stdout, Stderr: res.Stderr}
	code := res.ExitCode
	var msg string
	switch {
	case errdefs.Is(err, errdefs.Timeout):
		msg = "timed out after " + cmd.Timeout.String()
	case errdefs.Is(err, errdefs.Canceled):
		msg = "canceled"
		if res.Signal == "" && code == 0 {
			code = -1 // no exit event: it never ended on its own
		}
	case err != nil:
		msg = asAPIError(err).message
	case res.Signal != "":
		msg = "killed by " + res.Signal
	}
	if msg != "" {
		out.ErrorMessage = &msg
	}
	out.ExitCode = &code
	writeJSON(w, http.StatusOK, out)
	return nil
}

// detached is the request's context without its cancellation, for work
// that must finish once begun (stop, remove, gc).
func detached(r *http.Request) context.Context { return context.WithoutCancel(r.Context()) }
