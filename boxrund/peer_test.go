package boxrund

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Without a token, the loopback TCP port serves the server's own user
// and root only: any other user of the host reaches 127.0.0.1 too, and
// the API runs code and mounts host directories as the server's user.
// With a token, the token decides.
func TestTCPServesOnlyItsUserWithoutToken(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to make a request as another user")
	}
	const py = "/usr/bin/python3" // the system's: one under root's home is not nobody's to run
	if _, err := os.Stat(py); err != nil {
		t.Skip("needs /usr/bin/python3, to make a request as another user")
	}
	get := func(url, token string, uid uint32) string {
		script := `import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]: req.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    r = urllib.request.urlopen(req, timeout=10); print(r.status)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())`
		cmd := exec.Command(py, "-c", script, url, token)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("request as uid %d: %v: %s", uid, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	const nobody = 65534
	for _, host := range []string{"127.0.0.1", "::1"} {
		srv, err := Listen(New(fx.eng, Options{}), ListenConfig{Host: host, Port: freePort()})
		if err != nil {
			if host == "::1" {
				t.Logf("no IPv6 loopback: %v", err)
				continue
			}
			t.Fatal(err)
		}
		serve(t, srv)
		url := "http://" + srv.TCPAddr() + "/v1/info"
		if got := get(url, "", 0); got != "200" {
			t.Errorf("%s: root: %s", host, got)
		}
		if got := get(url, "", nobody); !strings.HasPrefix(got, "403") || !strings.Contains(got, "uid 65534") {
			t.Errorf("%s: another user, no token: %s; want 403 naming the uid", host, got)
		}
		tcpClient(srv.TCPAddr(), "").do(t, "GET", "/v1/info", "").want(t, 200) // this process
	}
	srv, err := Listen(New(fx.eng, Options{}), ListenConfig{Port: freePort(), Token: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	serve(t, srv)
	url := "http://" + srv.TCPAddr() + "/v1/info"
	if got := get(url, "s3cret", nobody); got != "200" {
		t.Errorf("another user with the token: %s", got)
	}
	if got := get(url, "", nobody); !strings.HasPrefix(got, "401") {
		t.Errorf("another user without the token: %s", got)
	}
}

// The kernel's socket table is read as it writes it.
func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000000000000000000001000000:0050": "[::1]:80",
		"0000000000000000FFFF00000100007F:01BB": "[::ffff:127.0.0.1]:443",
	} {
		got, err := parseProcAddr(in)
		if err != nil || got.String() != want {
			t.Errorf("%s: %v %v, want %s", in, got, err, want)
		}
	}
	if !sameAddrPort(netip.MustParseAddrPort("[::ffff:127.0.0.1]:443"), netip.MustParseAddrPort("127.0.0.1:443")) {
		t.Error("a mapped IPv4 address is not its IPv4 one")
	}
	// Our own connection, as the server would see it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if uid := peerUID(s); uid != os.Geteuid() {
		t.Errorf("peer uid %d, want %d", uid, os.Geteuid())
	}
	// Once the client has closed its end, no process holds it: the
	// kernel shows it with uid 0 (and inode 0), which must not read as
	// root (another user's request, sent and closed before the server
	// looked, was served as root's).
	c.Close()
	uid := 0
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if uid = peerUID(s); uid == -1 {
			break
		}
	}
	if uid != -1 {
		t.Errorf("a client end closed by its owner: uid %d, want -1 (unknown)", uid)
	}
}
