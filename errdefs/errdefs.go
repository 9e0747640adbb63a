// Package errdefs holds the typed errors shared by every boxrun package.
//
// Each error carries one of the BoxRun error codes (the same strings the
// BoxRun REST API puts in its {"code", "message"} body), so a failure deep in
// the image puller surfaces unchanged through the engine and the server.
package errdefs

import (
	"errors"
	"fmt"
)

// Code is a BoxRun error code.
type Code string

// The BoxRun error codes.
const (
	BoxNotFound         Code = "BOX_NOT_FOUND"
	ExecNotFound        Code = "EXEC_NOT_FOUND"
	BoxAlreadyRunning   Code = "BOX_ALREADY_RUNNING"
	NameAlreadyExists   Code = "NAME_ALREADY_EXISTS"
	ResourceExceeded    Code = "RESOURCE_EXCEEDED"
	BoxNotRunning       Code = "BOX_NOT_RUNNING"
	ExecAlreadyFinished Code = "EXEC_ALREADY_FINISHED"
	RuntimeError        Code = "RUNTIME_ERROR"
	ImagePullFailed     Code = "IMAGE_PULL_FAILED"
	Timeout             Code = "TIMEOUT"
	Canceled            Code = "CANCELED"
	ValidationError     Code = "VALIDATION_ERROR"

	// Codes of the engine's image management, beyond the BoxRun API's
	// enum (an HTTP server maps them as the enum's rule does: 404 for
	// *_NOT_FOUND, 409 for a conflict).
	ImageNotFound Code = "IMAGE_NOT_FOUND" // 404: no such image in the store
	ImageInUse    Code = "IMAGE_IN_USE"    // 409: a box uses the image
)

// Error is an error with a BoxRun code. Err, when set, is the cause and is
// reachable through errors.Unwrap.
type Error struct {
	Code    Code
	Message string
	Err     error
}

func (e *Error) Error() string {
	if e.Err != nil && e.Message == "" {
		return fmt.Sprintf("[%s] %v", e.Code, e.Err)
	}
	if e.Err != nil {
		return fmt.Sprintf("[%s] %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("[%s] %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is(err, &Error{Code: X}) match any error of code X.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Err == nil && t.Code == e.Code
}

// New returns an error of the given code.
func New(code Code, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap returns an error of the given code whose cause is err.
func Wrap(code Code, err error, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Err: err}
}

// CodeOf reports the code of the first *Error in err's chain, or
// RuntimeError for any other non-nil error, or "" for nil.
func CodeOf(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return RuntimeError
}

// Is reports whether err carries the given code.
func Is(err error, code Code) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}
