package exec

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxrun/boxrun/errdefs"
)

// The configuration's wire form is part of the protocol the agent (built
// separately, maybe from another version) decodes.
func TestConfigureRequestEncoding(t *testing.T) {
	req := &request{
		Op:      "configure",
		Mounts:  []Mount{{Tag: "vol0", Path: "/data", ReadOnly: true}, {Tag: "vol1", Path: "/work"}},
		Network: &Network{Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}},
	}
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"op":"configure","mounts":[{"tag":"vol0","path":"/data","read_only":true},{"tag":"vol1","path":"/work"}],` +
		`"network":{"address":"10.0.2.15/24","gateway":"10.0.2.2","dns":["10.0.2.3"]}}`
	if string(b) != want {
		t.Errorf("encoding:\n got %s\nwant %s", b, want)
	}
	var back request
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&back, req) {
		t.Errorf("round trip: %+v", back)
	}
	// A hello without configuration carries none.
	b, _ = json.Marshal(&request{Op: "hello", Time: 1})
	if string(b) != `{"op":"hello","time":1}` {
		t.Errorf("hello encoding %s", b)
	}
}

type configureCall struct {
	mounts  []Mount
	network *Network
}

func TestHelloConfigures(t *testing.T) {
	var mu sync.Mutex
	var calls []configureCall
	var clock []time.Time
	fail := ""
	c := startServer(t, ServerOptions{
		SetClock: func(t time.Time) error {
			mu.Lock()
			clock = append(clock, t)
			mu.Unlock()
			return nil
		},
		Configure: func(ctx context.Context, mounts []Mount, network *Network) error {
			mu.Lock()
			defer mu.Unlock()
			calls = append(calls, configureCall{mounts, network})
			if fail != "" {
				return errors.New(fail)
			}
			return nil
		},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reset := func() {
		mu.Lock()
		calls, clock = nil, nil
		mu.Unlock()
	}
	reset()

	req := HelloRequest{
		Time:    time.Date(2031, 2, 3, 4, 5, 6, 0, time.UTC),
		Mounts:  []Mount{{Tag: "vol0", Path: "/data", ReadOnly: true}, {Tag: "v-1.x_y", Path: "/a/b/c"}},
		Network: &Network{Interface: "eth0", Address: "10.0.2.15/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3", "fe80::1%eth0"}},
	}
	info, err := c.Hello(ctx, req)
	if err != nil || info == nil || info.Protocol != ProtocolVersion {
		t.Fatalf("hello: %+v %v", info, err)
	}
	mu.Lock()
	if len(calls) != 1 || !reflect.DeepEqual(calls[0], configureCall{req.Mounts, req.Network}) {
		t.Errorf("configure calls %+v", calls)
	}
	if len(clock) == 0 || clock[0].Before(req.Time) || clock[0].Sub(req.Time) > time.Second {
		t.Errorf("clock %v", clock)
	}
	mu.Unlock()

	// Nothing to configure, no clock: neither is touched.
	reset()
	if _, err := c.Hello(ctx, HelloRequest{}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(calls) != 0 || len(clock) != 0 {
		t.Errorf("empty hello: configure %+v, clock %v", calls, clock)
	}
	mu.Unlock()

	// The agent's failure is the Hello's error; the handshake still counts.
	mu.Lock()
	fail = `volume "vol0" at /data: no virtio-9p device with mount tag "vol0"`
	mu.Unlock()
	info, err = c.Hello(ctx, req)
	if err == nil || !errdefs.Is(err, errdefs.RuntimeError) || !strings.Contains(err.Error(), `volume "vol0" at /data: no virtio-9p device`) {
		t.Errorf("failing configure: %v", err)
	}
	if info == nil || info.Protocol != ProtocolVersion {
		t.Errorf("failing configure: info %+v", info)
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("connection unusable after a failed configure: %v", err)
	}
}

func TestHelloValidatesConfig(t *testing.T) {
	var mu sync.Mutex
	called := 0
	c := startServer(t, ServerOptions{Configure: func(context.Context, []Mount, *Network) error {
		mu.Lock()
		called++
		mu.Unlock()
		return nil
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		req  HelloRequest
		want string
	}{
		{HelloRequest{Mounts: []Mount{{Tag: "", Path: "/x"}}}, "mount tag must be 1 to 31 bytes"},
		{HelloRequest{Mounts: []Mount{{Tag: strings.Repeat("a", 32), Path: "/x"}}}, "1 to 31 bytes"},
		{HelloRequest{Mounts: []Mount{{Tag: "a,b", Path: "/x"}}}, "letters, digits"},
		{HelloRequest{Mounts: []Mount{{Tag: "0abc", Path: "/x"}}}, "starting with a letter"},
		{HelloRequest{Mounts: []Mount{{Tag: "v", Path: "x"}}}, `mount point "x" is not an absolute path`},
		{HelloRequest{Mounts: []Mount{{Tag: "v", Path: "/.."}}}, "cannot mount on the box root"},
		{HelloRequest{Mounts: []Mount{{Tag: "v", Path: "/x"}, {Tag: "v", Path: "/y"}}}, "tag used twice"},
		{HelloRequest{Mounts: []Mount{{Tag: "v", Path: "/x"}, {Tag: "w", Path: "/x/"}}}, "both mounted on /x"},
		{HelloRequest{Network: &Network{Address: "10.0.2.15"}}, "want CIDR notation"},
		{HelloRequest{Network: &Network{Address: "10.0.2.15/24", Gateway: "fe80::1"}}, "different IP versions"},
		{HelloRequest{Network: &Network{Gateway: "gw"}}, "is not an IP address"},
		{HelloRequest{Network: &Network{DNS: []string{"1.1.1.1\noptions evil"}}}, `DNS server "1.1.1.1\noptions evil"`},
		{HelloRequest{Network: &Network{Interface: "a/b"}}, "bad interface name"},
		{HelloRequest{Network: &Network{Interface: "sixteen-chars-xx"}}, "bad interface name"},
		{HelloRequest{Disks: map[string]int64{"/dev/sda": 512}}, `disk "/dev/sda"`},
		{HelloRequest{Disks: map[string]int64{"/dev/vd../x": 512}}, "want /dev/vd<letters>"},
		{HelloRequest{Disks: map[string]int64{"/dev/vdb": 0}}, "positive number of 512-byte sectors"},
		{HelloRequest{Disks: map[string]int64{"/dev/vdb": 1000}}, "512-byte sectors"},
	} {
		_, err := c.Hello(ctx, tc.req)
		if !errdefs.Is(err, errdefs.ValidationError) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want a validation error with %q", tc.req, err, tc.want)
		}
	}
	// The agent checks too, whatever the host sends.
	_, err := c.call(ctx, &request{Op: "configure", Mounts: []Mount{{Tag: "v", Path: "relative"}}})
	if !errdefs.Is(err, errdefs.ValidationError) || !strings.Contains(err.Error(), "not an absolute path") {
		t.Errorf("agent-side validation: %v", err)
	}
	_, err = c.call(ctx, &request{Op: "hello", Disks: map[string]int64{"/sys/kernel": 512}})
	if !errdefs.Is(err, errdefs.ValidationError) || !strings.Contains(err.Error(), `disk "/sys/kernel"`) {
		t.Errorf("agent-side validation of disks: %v", err)
	}
	mu.Lock()
	if called != 0 {
		t.Errorf("Configure called %d times with invalid requests", called)
	}
	mu.Unlock()
}

// A server that cannot configure says so instead of ignoring the request.
func TestHelloConfigureUnsupported(t *testing.T) {
	c := startServer(t, ServerOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Hello(ctx, HelloRequest{Time: time.Now(), Mounts: []Mount{{Tag: "v", Path: "/v"}}})
	if err == nil || !strings.Contains(err.Error(), "cannot mount volumes") {
		t.Errorf("got %v", err)
	}
}

// The Hello hands the disks' sizes to the agent's Setup, which waits for
// them before mounting (exec/agent).
func TestHelloPassesDiskSizes(t *testing.T) {
	var mu sync.Mutex
	var got []map[string]int64
	c := startServer(t, ServerOptions{Setup: func(ctx context.Context, s Setup) error {
		mu.Lock()
		got = append(got, s.Disks)
		mu.Unlock()
		return nil
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	want := map[string]int64{"/dev/vda": 256 << 20, "/dev/vdb": 3 << 30}
	if _, err := c.Hello(ctx, HelloRequest{Disks: want}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) == 0 || !reflect.DeepEqual(got[len(got)-1], want) {
		t.Errorf("Setup got disks %v, want %v last", got, want)
	}
}
