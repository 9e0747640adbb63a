package boxrund

import (
	"net/http"
	"testing"

	"github.com/boxrun/boxrun/errdefs"
)

// TestStatusOf: every engine code has its HTTP status (spec §2, and the
// codes beyond it).
func TestStatusOf(t *testing.T) {
	for code, want := range map[errdefs.Code]int{
		errdefs.BoxNotFound: 404, errdefs.ExecNotFound: 404, errdefs.ImageNotFound: 404,
		errdefs.BoxAlreadyRunning: 409, errdefs.NameAlreadyExists: 409, errdefs.ResourceExceeded: 409, errdefs.ImageInUse: 409,
		errdefs.BoxNotRunning: 400, errdefs.ExecAlreadyFinished: 400, errdefs.RuntimeError: 400, errdefs.ImagePullFailed: 400,
		errdefs.Timeout: 400, errdefs.Canceled: 400, errdefs.ValidationError: http.StatusUnprocessableEntity,
	} {
		if got := statusOf(code); got != want {
			t.Errorf("%s → %d, want %d", code, got, want)
		}
	}
}
