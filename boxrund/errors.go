package boxrund

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// apiError is an error answer: a status and the {code, message} body.
type apiError struct {
	status  int
	code    string
	message string
}

func (e *apiError) Error() string { return fmt.Sprintf("%d [%s] %s", e.status, e.code, e.message) }

func newError(status int, code errdefs.Code, format string, args ...any) *apiError {
	return &apiError{status: status, code: string(code), message: fmt.Sprintf(format, args...)}
}

// invalid is a body that parsed but failed validation: 422, as upstream.
func invalid(format string, args ...any) *apiError {
	return newError(http.StatusUnprocessableEntity, errdefs.ValidationError, format, args...)
}

// badRequest is a request that is malformed (not JSON, broken multipart,
// missing :action): 400 VALIDATION_ERROR.
func badRequest(format string, args ...any) *apiError {
	return newError(http.StatusBadRequest, errdefs.ValidationError, format, args...)
}

// statusOf maps an engine error's code to its HTTP status (spec §2):
// 404 for *_NOT_FOUND, 409 for conflicts, 422 for validation, else 400.
func statusOf(code errdefs.Code) int {
	switch code {
	case errdefs.BoxNotFound, errdefs.ExecNotFound, errdefs.ImageNotFound:
		return http.StatusNotFound
	case errdefs.ResourceExceeded, errdefs.NameAlreadyExists, errdefs.BoxAlreadyRunning, errdefs.ImageInUse:
		return http.StatusConflict
	case errdefs.ValidationError:
		return http.StatusUnprocessableEntity
	}
	return http.StatusBadRequest
}

// asAPIError turns any error into an answer. Engine errors keep their code
// and message (without the "[CODE]" prefix, which travels as code).
func asAPIError(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	var e *errdefs.Error
	if errors.As(err, &e) {
		msg := e.Message
		if e.Err != nil {
			if msg == "" {
				msg = e.Err.Error()
			} else {
				msg += ": " + e.Err.Error()
			}
		}
		return &apiError{status: statusOf(e.Code), code: string(e.Code), message: msg}
	}
	return &apiError{status: http.StatusBadRequest, code: string(errdefs.RuntimeError), message: err.Error()}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	ae := asAPIError(err)
	writeJSON(w, ae.status, map[string]string{"code": ae.code, "message": ae.message})
}

// maxJSONBody caps every JSON request body; uploads are streamed instead.
const maxJSONBody = 1 << 20

// bodyDeadline bounds how long reading a JSON body may take, so a client
// that sends half a body cannot hold a handler.
const bodyDeadline = 30 * time.Second

// decode reads a JSON request body into v. An empty body is allowed when
// optional (then v keeps its zero value). Answers: 415 for a body that is
// not JSON by its Content-Type, 413 past maxJSONBody, 400 for malformed
// JSON, 422 for a value of the wrong type. Unknown keys are ignored, as
// upstream does: newer clients may send more.
func decode(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyDeadline))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxJSONBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return newError(http.StatusRequestEntityTooLarge, errdefs.ValidationError, "request body is larger than %d bytes", maxJSONBody)
		}
		return badRequest("reading request body: %v", err)
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		if optional {
			return nil
		}
		return badRequest("a JSON request body is required")
	}
	if ct := r.Header.Get("Content-Type"); !isJSON(ct) {
		return newError(http.StatusUnsupportedMediaType, errdefs.ValidationError,
			"Content-Type must be application/json (got %q)", ct)
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field := te.Field
			if field == "" {
				field = "body"
			}
			return invalid("%s must be %s, not %s", field, jsonKind(te.Type.String()), te.Value)
		}
		return badRequest("malformed JSON body: %v", err)
	}
	if dec.More() {
		return badRequest("malformed JSON body: more than one JSON value")
	}
	return nil
}

func isJSON(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	return err == nil && (mt == "application/json" || strings.HasSuffix(mt, "+json"))
}

// jsonKind names a Go type the way a JSON user thinks of it.
func jsonKind(goType string) string {
	switch {
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "map["), strings.HasPrefix(goType, "boxrund."):
		return "an object"
	case strings.Contains(goType, "int"):
		return "an integer"
	case strings.Contains(goType, "bool"):
		return "a boolean"
	case strings.Contains(goType, "string"):
		return "a string"
	}
	return goType
}
