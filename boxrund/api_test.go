package boxrund

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/boxrun/boxrun"
)

// TestNoVM covers what needs no box (spec §8.3 tier 1): info, validation,
// lookups, actions, the redirect and the page, over both transports.
func TestNoVM(t *testing.T) {
	forEachTransport(t, func(t *testing.T, c *client) {
		info := c.do(t, "GET", "/v1/info", "").want(t, 200).object(t)
		if info["max_cpu"].(float64) != 64 || info["max_memory_mb"].(float64) != 64<<10 {
			t.Errorf("info %v", info)
		}
		boots, ok := info["boots"].(map[string]any)
		if !ok || len(boots) != 7 || boots["warm"] == nil || boots["premounted"] == nil || boots["image_templates"] == nil || boots["cold"] == nil || info["pool_ready"] == nil {
			t.Errorf("info boots %v, pool_ready %v", info["boots"], info["pool_ready"])
		}
		if info["hypervisor"] != fx.eng.Info().Hypervisor || info["hypervisor"] == "" {
			t.Errorf("info hypervisor %v", info["hypervisor"])
		}
		for _, tc := range []struct{ body, msg string }{
			{`{"image":"x","cpu":0}`, "cpu must be greater than 0"},
			{`{"image":"x","cpu":-1}`, "cpu must be greater than 0"},
			{`{"image":"x","memory_mb":-1}`, "memory_mb must be greater than 0"},
			{`{"image":"x","disk_size_gb":0}`, "disk_size_gb must be greater than 0"},
			{`{"image":"x","workdir":"relative"}`, "workdir must be an absolute path"},
			{`{"cpu":1}`, "image is required"},
			{`{"image":null}`, "image is required"},
			{`{"image":"x","cpu":"two"}`, "cpu must be an integer"},
			{`{"image":"x","env":["A=1"]}`, "env must be an object"},
			{`{"image":"x","volumes":[{"host_path":"rel","guest_path":"/m"}]}`, "volume paths must be absolute"},
			// Sizes past any machine: 422, not an overflow.
			{`{"image":"x","cpu":1025}`, "cpu must be at most 1024"},
			{`{"image":"x","cpu":9223372036854775807}`, "cpu must be at most 1024"},
			{`{"image":"x","memory_mb":16777217}`, "memory_mb must be at most 16777216"},
			{`{"image":"x","memory_mb":9223372036854775807}`, "memory_mb must be at most"},
			{`{"image":"x","disk_size_gb":65537}`, "disk_size_gb must be at most 65536"},
			{`{"image":"x","disk_size_gb":9223372036854775807}`, "disk_size_gb must be at most"},
		} {
			c.do(t, "POST", "/v1/boxes", tc.body).wantError(t, 422, "VALIDATION_ERROR", tc.msg)
		}
		c.do(t, "POST", "/v1/run", `{"image":"x","cmd":[]}`).wantError(t, 422, "VALIDATION_ERROR", "cmd must be a non-empty list")
		c.do(t, "POST", "/v1/run", `{"image":"x","cmd":["true"],"timeout_ms":0}`).wantError(t, 422, "VALIDATION_ERROR", "timeout_ms must be positive")
		c.do(t, "GET", "/v1/boxes/nonexistent", "").wantError(t, 404, "BOX_NOT_FOUND", "Box 'nonexistent' not found")
		c.do(t, "GET", "/v1/boxes/nonexistent:stop", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/nonexistent:stop", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/nonexistent:start", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "DELETE", "/v1/boxes/nonexistent", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "DELETE", "/v1/boxes/nonexistent?force=true", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "GET", "/v1/boxes/nonexistent/execs", "").wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/nonexistent/exec", `{"cmd":["true"]}`).wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/box_1/exec", `{"cmd":[]}`).wantError(t, 422, "VALIDATION_ERROR", "cmd must be a non-empty list")
		c.do(t, "POST", "/v1/boxes/box_1/exec", `{"cmd":["ls"],"workdir":"rel"}`).wantError(t, 422, "VALIDATION_ERROR", "workdir must be an absolute path")
		c.do(t, "POST", "/v1/boxes/box_1/exec", `{"cmd":["ls"],"timeout_ms":-1}`).wantError(t, 422, "VALIDATION_ERROR", "timeout_ms must be positive")
		c.do(t, "POST", "/v1/boxes/box_1/exec", `{"cmd":["ls"],"timeout_ms":9223372036854775807}`).wantError(t, 422, "VALIDATION_ERROR", "timeout_ms must be at most")
		c.do(t, "POST", "/v1/run", `{"image":"x","cmd":["ls"],"timeout_ms":2592000001}`).wantError(t, 422, "VALIDATION_ERROR", "timeout_ms must be at most")
		c.do(t, "POST", "/v1/run", `{"image":"x","cmd":["ls"],"cpu":100000}`).wantError(t, 422, "VALIDATION_ERROR", "cpu must be at most")
		// An upload is checked for multipart before its box is looked up.
		c.send(t, c.req(t, "POST", "/v1/boxes/nonexistent/files/upload", "application/json", strings.NewReader("{}"))).wantError(t, 400, "VALIDATION_ERROR", "multipart/form-data")
		c.do(t, "GET", "/v1/boxes/box_1/exec/nonexistent", "").wantError(t, 404, "EXEC_NOT_FOUND", "Exec 'nonexistent' not found")
		c.do(t, "GET", "/v1/boxes/box_1/exec/nonexistent/events", "").wantError(t, 404, "EXEC_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/box_1/exec/nonexistent:cancel", "").wantError(t, 404, "EXEC_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/box_1/exec/nonexistent:kill", "").wantError(t, 400, "VALIDATION_ERROR", "Unknown action: kill")
		c.do(t, "POST", "/v1/boxes/box_1/exec/nonexistent", "").wantError(t, 400, "VALIDATION_ERROR", "Missing action (expected :cancel)")
		c.do(t, "POST", "/v1/boxes/box_1:unknown", "").wantError(t, 400, "VALIDATION_ERROR", "Unknown action: unknown")
		c.do(t, "POST", "/v1/boxes/box_1", "").wantError(t, 400, "VALIDATION_ERROR", "Missing action")
		c.do(t, "POST", "/v1/boxes/nonexistent/files/download", `{"path":"/etc/passwd"}`).wantError(t, 404, "BOX_NOT_FOUND", "nonexistent")
		c.do(t, "POST", "/v1/boxes/nonexistent/files/download", `{}`).wantError(t, 422, "VALIDATION_ERROR", "path is required")
		c.do(t, "GET", "/v1/boxes?status=no-such-status", "").want(t, 200)
		if got := c.do(t, "GET", "/v1/boxes?status=no-such-status", "").array(t); len(got) != 0 {
			t.Errorf("unknown status listed %d boxes", len(got))
		}
		c.do(t, "GET", "/v1/nope", "").wantError(t, 404, "NOT_FOUND", "/v1/nope")
		c.do(t, "PUT", "/v1/boxes", "{}").wantError(t, 405, "METHOD_NOT_ALLOWED", "PUT")
		c.do(t, "DELETE", "/v1/info", "").wantError(t, 405, "METHOD_NOT_ALLOWED", "DELETE")
		// Resource limits are checked before any VM work.
		c.do(t, "POST", "/v1/boxes", boxBody(`"name":"too-big","cpu":65`)).wantError(t, 409, "RESOURCE_EXCEEDED", "Total CPU limit (64) would be exceeded")
		c.do(t, "POST", "/v1/boxes", boxBody(`"cpu":1,"memory_mb":70000`)).wantError(t, 409, "RESOURCE_EXCEEDED", "Total memory limit")
		c.do(t, "POST", "/v1/boxes", boxBody(`"volumes":[{"host_path":"/no/such/dir","guest_path":"/m"}]`)).wantError(t, 400, "RUNTIME_ERROR", "Volume host path does not exist")
		c.do(t, "POST", "/v1/boxes", `{"image":"docker://127.0.0.1:1/none:latest"}`).wantError(t, 400, "IMAGE_PULL_FAILED", "127.0.0.1:1/none")
		// Network policy and ports (beyond upstream) are validated before any VM work.
		c.do(t, "POST", "/v1/boxes", boxBody(`"ports":[{"host_port":18080,"guest_port":80}]`)).wantError(t, 422, "VALIDATION_ERROR", "need network: true")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"network_policy":{"allow":["127.0.0.1"]}`)).wantError(t, 422, "VALIDATION_ERROR", "AllowHostPorts")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"network_policy":{"deny":["not a rule"]}`)).wantError(t, 422, "VALIDATION_ERROR", "not a CIDR")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"ports":[{"host_port":0,"guest_port":80}]`)).wantError(t, 422, "VALIDATION_ERROR", "1-65535")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"ports":[{"host_port":18081,"guest_port":80},{"host_port":18081,"host_ip":"0.0.0.0","guest_port":81}]`)).wantError(t, 422, "VALIDATION_ERROR", "published twice")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"ports":[{"host_port":1,"guest_port":80,"protocol":"sctp"}]`)).wantError(t, 422, "VALIDATION_ERROR", "only tcp")
		c.do(t, "POST", "/v1/boxes", boxBody(`"network":true,"network_policy":{"allow_host_ports":"all"}`)).wantError(t, 422, "VALIDATION_ERROR", "must be")
		busy, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		c.do(t, "POST", "/v1/boxes", boxBody(fmt.Sprintf(`"name":"busy-port","network":true,"ports":[{"host_port":%d,"guest_port":80}]`, busy.Addr().(*net.TCPAddr).Port))).wantError(t, 400, "RUNTIME_ERROR", "publish port")
		busy.Close()
		c.do(t, "POST", "/v1/gc", `{"older_than":-1}`).wantError(t, 422, "VALIDATION_ERROR", "older_than")
		gc := c.do(t, "POST", "/v1/gc", `{"older_than":3600}`).want(t, 200).object(t)
		wantKeys(t, "gc", gc, "removed")
		c.do(t, "POST", "/v1/gc", "").want(t, 200) // beyond upstream: no body means the default
		// None of the failed creates left a box behind.
		for _, b := range c.do(t, "GET", "/v1/boxes", "").array(t) {
			if b["name"] == "too-big" || b["name"] == "busy-port" || b["status"] == "creating" {
				t.Errorf("failed create left %v", b)
			}
		}
		root := c.send(t, c.req(t, "GET", "/", "", nil))
		if root.status != 200 || !strings.Contains(string(root.body), "<html") { // the client follows the 303
			t.Errorf("GET / followed: %d", root.status)
		}
		noFollow := *c.http
		noFollow.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
		rr, err := noFollow.Do(c.req(t, "GET", "/", "", nil))
		if err != nil {
			t.Fatal(err)
		}
		rr.Body.Close()
		if rr.StatusCode != 303 || rr.Header.Get("Location") != "/ui" {
			t.Errorf("GET /: %d Location %q, want 303 /ui", rr.StatusCode, rr.Header.Get("Location"))
		}
		ui := c.do(t, "GET", "/ui", "").want(t, 200)
		if !strings.HasPrefix(ui.header.Get("Content-Type"), "text/html") {
			t.Errorf("/ui Content-Type %q", ui.header.Get("Content-Type"))
		}
	})
}

// TestBoxLifecycle drives one box per transport through every box, exec
// and file route, checking exact key sets, statuses and error codes.
func TestBoxLifecycle(t *testing.T) {
	forEachTransport(t, func(t *testing.T, c *client) {
		name := "life-" + c.name
		box := newBox(t, c, boxBody(`"name":"`+name+`","env":{"BOX_VAR":"b"}`))
		wantKeys(t, "box", box, boxKeys)
		id := box["id"].(string)
		if !strings.HasPrefix(id, "box_") || box["status"] != "running" || box["name"] != name ||
			box["workdir"] != "/root" || box["started_at"] == nil || box["stopped_at"] != nil ||
			box["boxlite_id"] == nil || box["network"] != false || box["volumes"] != nil || box["error_code"] != nil {
			t.Errorf("created box %v", box)
		}
		if !strings.HasSuffix(box["created_at"].(string), "+00:00") {
			t.Errorf("created_at %v", box["created_at"])
		}
		c.do(t, "POST", "/v1/boxes", boxBody(`"name":"`+name+`"`)).wantError(t, 409, "NAME_ALREADY_EXISTS", "A box with name '"+name+"' already exists")
		c.do(t, "POST", "/v1/boxes", boxBody(`"name":"`+id+`"`)).wantError(t, 409, "NAME_ALREADY_EXISTS", id)
		for _, key := range []string{id, name, id + ":stop"} {
			if got := c.do(t, "GET", "/v1/boxes/"+key, "").want(t, 200).object(t); got["id"] != id {
				t.Errorf("GET %s: id %v", key, got["id"])
			}
		}
		found := false
		for _, b := range c.do(t, "GET", "/v1/boxes?status=running", "").array(t) {
			wantKeys(t, "listed box", b, boxKeys)
			found = found || b["id"] == id
			if b["status"] != "running" {
				t.Errorf("?status=running listed %v", b["status"])
			}
		}
		if !found {
			t.Errorf("box %s not listed as running", id)
		}
		c.do(t, "POST", "/v1/boxes/"+name+":start", "").wantError(t, 409, "BOX_ALREADY_RUNNING", "is already running")
		c.do(t, "DELETE", "/v1/boxes/"+id, "").wantError(t, 409, "BOX_ALREADY_RUNNING", "Use force=true")
		c.do(t, "DELETE", "/v1/boxes/"+id+"?force=1", "").wantError(t, 409, "BOX_ALREADY_RUNNING", "Use force=true")

		// exec by name: 201, exactly 11 keys, echoing the request.
		x := c.do(t, "POST", "/v1/boxes/"+name+"/exec", `{"cmd":["sh","-c","echo out; echo err >&2; echo $BOX_VAR$X_VAR; exit 3"],"env":{"X_VAR":"x"},"workdir":"/tmp","timeout_ms":60000}`).want(t, 201).object(t)
		wantKeys(t, "exec", x, execKeys)
		xid := x["id"].(string)
		if !strings.HasPrefix(xid, "exec_") || x["box_id"] != id || x["status"] != "running" || x["exit_code"] != nil ||
			x["finished_at"] != nil || x["workdir"] != "/tmp" || x["timeout_ms"] != float64(60000) {
			t.Errorf("started exec %v", x)
		}
		done := c.waitExec(t, xid)
		wantKeys(t, "finished exec", done, execKeys)
		if done["status"] != "failed" || done["exit_code"] != float64(3) || done["finished_at"] == nil {
			t.Errorf("finished exec %v", done)
		}
		evs, _ := c.events(t, xid)
		stdout, stderr, exit := output(t, evs)
		if stdout != "out\nbx\n" || stderr != "err\n" || exit["exit_code"] != float64(3) {
			t.Errorf("events: stdout %q stderr %q exit %v", stdout, stderr, exit)
		}
		ok := c.do(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["true"],"env":null,"workdir":null,"timeout_ms":null}`).want(t, 201).object(t)
		if ok["env"] != nil || ok["workdir"] != nil || ok["timeout_ms"] != nil {
			t.Errorf("nulls not echoed as null: %v", ok)
		}
		if got := c.waitExec(t, ok["id"].(string)); got["status"] != "succeeded" || got["exit_code"] != float64(0) {
			t.Errorf("true: %v", got)
		}
		c.do(t, "POST", "/v1/boxes/"+id+"/exec/"+xid+":cancel", "").wantError(t, 400, "EXEC_ALREADY_FINISHED", "Exec already finished")
		c.do(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["/no/such/program"]}`).wantError(t, 400, "RUNTIME_ERROR", "/no/such/program")
		list := c.do(t, "GET", "/v1/boxes/"+name+"/execs", "").want(t, 200).array(t)
		if len(list) != 3 || list[len(list)-1]["id"] != xid {
			t.Errorf("execs list %d entries, oldest %v", len(list), list[len(list)-1]["id"])
		}
		for _, e := range list {
			wantKeys(t, "listed exec", e, execKeys)
		}

		// cancel a running exec: canceled, null exit code, stream ends.
		slow := c.do(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["sleep","300"]}`).want(t, 201).object(t)
		cx := c.do(t, "POST", "/v1/boxes/"+id+"/exec/"+slow["id"].(string)+":cancel", "").want(t, 200).object(t)
		if cx["status"] != "canceled" || cx["exit_code"] != nil || cx["finished_at"] == nil {
			t.Errorf("canceled exec %v", cx)
		}
		evs, _ = c.events(t, slow["id"].(string))
		if _, _, exit := output(t, evs); exit["exit_code"] != nil || exit["error"] != "canceled" {
			t.Errorf("canceled exit data %v", exit)
		}
		// timeout: failed, with a reason.
		to := c.do(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["sleep","300"],"timeout_ms":500}`).want(t, 201).object(t)
		if got := c.waitExec(t, to["id"].(string)); got["status"] != "failed" || got["error_message"] == nil {
			t.Errorf("timed out exec %v", got)
		}

		testFiles(t, c, id, name)

		st := c.do(t, "POST", "/v1/boxes/"+name+":stop", "").want(t, 200).object(t)
		wantKeys(t, "stopped box", st, boxKeys)
		if st["status"] != "stopped" || st["stopped_at"] == nil || st["started_at"] == nil || st["boxlite_id"] != nil {
			t.Errorf("stopped box %v", st)
		}
		c.do(t, "POST", "/v1/boxes/"+id+":stop", "").wantError(t, 400, "BOX_NOT_RUNNING", "is not running (status: stopped)")
		// An older_than past what a duration holds removes nothing (it
		// used to overflow into "everything stopped").
		for _, older := range []string{"9223372036854775807", "9223372036854775", "315360000000"} {
			gc := c.do(t, "POST", "/v1/gc", `{"older_than":`+older+`}`).want(t, 200).object(t)
			if gc["removed"] != float64(0) {
				t.Errorf("gc older_than %s removed %v", older, gc["removed"])
			}
		}
		c.do(t, "GET", "/v1/boxes/"+id, "").want(t, 200)
		c.do(t, "POST", "/v1/boxes/"+id+"/exec", `{"cmd":["true"]}`).wantError(t, 400, "BOX_NOT_RUNNING", "is not running")
		c.do(t, "POST", "/v1/boxes/"+id+"/files/download", `{"path":"/etc/passwd"}`).wantError(t, 400, "BOX_NOT_RUNNING", "Box is not running")
		up := c.upload(t, id, "dest", "/root/x", []byte("x"), false)
		up.wantError(t, 400, "BOX_NOT_RUNNING", "Box is not running")
		if got := c.do(t, "GET", "/v1/boxes?status=stopped", "").array(t); !hasID(got, id) {
			t.Errorf("stopped box not listed under ?status=stopped")
		}
		sb := c.do(t, "POST", "/v1/boxes/"+id+":start", "").want(t, 200).object(t)
		if sb["status"] != "running" || sb["stopped_at"] != nil {
			t.Errorf("started box %v", sb)
		}
		// What the box wrote survived.
		got := c.download(t, id, "/root/up/nested/hello.txt").want(t, 200)
		if string(got.body) != "hello\n" {
			t.Errorf("after restart: %q", got.body)
		}
		c.do(t, "DELETE", "/v1/boxes/"+id+"?force=true", "").want(t, 200)
		if m := c.do(t, "GET", "/v1/boxes/"+id, "").object(t); m["code"] != "BOX_NOT_FOUND" {
			t.Errorf("removed box still found: %v", m)
		}
		c.do(t, "GET", "/v1/boxes/x/exec/"+xid, "").wantError(t, 404, "EXEC_NOT_FOUND", xid)
	})
}

func hasID(list []map[string]any, id string) bool {
	for _, b := range list {
		if b["id"] == id {
			return true
		}
	}
	return false
}

// upload sends a multipart upload with the destination in field destField,
// before the file part or (fileFirst) after it.
func (c *client) upload(t *testing.T, box, destField, dest string, data []byte, fileFirst bool) *resp {
	t.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	writeFile := func() {
		fw, _ := mw.CreateFormFile("file", "upload.bin")
		fw.Write(data)
	}
	if fileFirst {
		writeFile()
	}
	mw.WriteField(destField, dest)
	if !fileFirst {
		writeFile()
	}
	mw.Close()
	return c.send(t, c.req(t, "POST", "/v1/boxes/"+box+"/files/upload", mw.FormDataContentType(), &body))
}

func (c *client) download(t *testing.T, box, p string) *resp {
	t.Helper()
	return c.do(t, "POST", "/v1/boxes/"+box+"/files/download", fmt.Sprintf(`{"path":%q}`, p))
}

func testFiles(t *testing.T, c *client, id, name string) {
	t.Helper()
	up := c.upload(t, name, "dest", "/root/up/nested/hello.txt", []byte("hello\n"), false).want(t, 200).object(t)
	if up["ok"] != true || up["dest"] != "/root/up/nested/hello.txt" {
		t.Errorf("upload answer %v", up)
	}
	blob := make([]byte, 5<<20+123)
	rand.Read(blob)
	sum := sha256.Sum256(blob)
	// Field order must not matter, and older SDKs send "path".
	c.upload(t, id, "path", "/root/blob.bin", blob, true).want(t, 200)
	res, err := fx.eng.Exec(ctxT(t, time.Minute), id, execSpec("sh", "-c", "sha256sum /root/blob.bin; stat -c %a /root/up/nested/hello.txt"))
	if err != nil || !strings.HasPrefix(res.Stdout, fmt.Sprintf("%x ", sum)) || !strings.HasSuffix(res.Stdout, "644\n") {
		t.Errorf("in box: %v %q", err, res.Stdout)
	}
	dl := c.download(t, id, "/root/blob.bin").want(t, 200)
	if !bytes.Equal(dl.body, blob) {
		t.Errorf("download: %d bytes, want %d, equal %v", len(dl.body), len(blob), bytes.Equal(dl.body, blob))
	}
	if dl.header.Get("Content-Type") != "application/octet-stream" || dl.header.Get("Content-Length") != fmt.Sprint(len(blob)) ||
		!strings.Contains(dl.header.Get("Content-Disposition"), `filename=blob.bin`) {
		t.Errorf("download headers %v", dl.header)
	}
	// A directory comes back as a tar stream.
	tr := c.download(t, id, "/root/up").want(t, 200)
	if tr.header.Get("Content-Type") != "application/x-tar" {
		t.Errorf("directory download Content-Type %q", tr.header.Get("Content-Type"))
	}
	names := tarNames(t, tr.body)
	if strings.Join(names, ",") != "up/,up/nested/,up/nested/hello.txt" {
		t.Errorf("directory tar entries %v", names)
	}
	c.download(t, id, "/root/missing.txt").wantError(t, 400, "RUNTIME_ERROR", "File '/root/missing.txt' not found in box")
	c.download(t, id, "/").wantError(t, 400, "RUNTIME_ERROR", "no filename")
	c.download(t, id, "relative").wantError(t, 422, "VALIDATION_ERROR", "absolute")
	c.upload(t, id, "dest", "/root/dir/", []byte("x"), false).wantError(t, 400, "RUNTIME_ERROR", "Invalid destination path (no filename)")
	c.upload(t, id, "other", "/root/x", []byte("x"), false).wantError(t, 400, "VALIDATION_ERROR", "Missing dest field")
	// Uploading over a directory fails and leaves it.
	c.upload(t, id, "dest", "/root/up", []byte("x"), false).wantError(t, 400, "RUNTIME_ERROR", "Failed to upload file")
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	mw.WriteField("dest", "/root/nofile")
	mw.Close()
	c.send(t, c.req(t, "POST", "/v1/boxes/"+id+"/files/upload", mw.FormDataContentType(), &body)).wantError(t, 400, "VALIDATION_ERROR", "Missing file field")
}

// tarNames lists a tar stream's entry names.
func tarNames(t *testing.T, b []byte) []string {
	t.Helper()
	var names []string
	r := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := r.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatalf("tar: %v", err)
		}
		names = append(names, h.Name)
	}
}

func execSpec(cmd ...string) boxrun.ExecSpec { return boxrun.ExecSpec{Cmd: cmd} }
