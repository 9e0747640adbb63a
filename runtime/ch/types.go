package ch

// The API's types, with the fields boxrun uses. Names follow the API
// document's schemas; every optional field is omitted when unset, so that
// CH applies its own default (and older CH versions, which ignore fields
// they do not know, accept the request).

// VmmPingResponse answers GET /vmm.ping.
type VmmPingResponse struct {
	BuildVersion string   `json:"build_version,omitempty"`
	Version      string   `json:"version"`
	PID          int64    `json:"pid,omitempty"`
	Features     []string `json:"features,omitempty"`
}

// VmConfig is the body of PUT /vm.create.
type VmConfig struct {
	Cpus    *CpusConfig    `json:"cpus,omitempty"`
	Memory  *MemoryConfig  `json:"memory,omitempty"`
	Payload PayloadConfig  `json:"payload"`
	Disks   []DiskConfig   `json:"disks,omitempty"`
	Net     []NetConfig    `json:"net,omitempty"`
	Rng     *RngConfig     `json:"rng,omitempty"`
	Fs      []FsConfig     `json:"fs,omitempty"`
	Serial  *ConsoleConfig `json:"serial,omitempty"`
	Console *ConsoleConfig `json:"console,omitempty"`
	Vsock   *VsockConfig   `json:"vsock,omitempty"`
}

// PayloadConfig is what the VM boots: a kernel (vmlinux with a PVH entry,
// or a bzImage from v39), its initramfs and command line.
type PayloadConfig struct {
	Firmware  string `json:"firmware,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	Initramfs string `json:"initramfs,omitempty"`
}

// CpusConfig sizes the vCPUs.
type CpusConfig struct {
	BootVcpus int `json:"boot_vcpus"`
	MaxVcpus  int `json:"max_vcpus"`
}

// MemoryConfig sizes guest memory, in bytes. Shared memory (MAP_SHARED) is
// what vhost-user devices such as virtio-fs need.
type MemoryConfig struct {
	Size   int64 `json:"size"`
	Shared bool  `json:"shared,omitempty"`
}

// DiskConfig is one virtio-blk disk.
type DiskConfig struct {
	Path     string `json:"path,omitempty"`
	Readonly bool   `json:"readonly,omitempty"`
	Direct   bool   `json:"direct,omitempty"`
	ID       string `json:"id,omitempty"`
	// ImageType "Raw" says what the image is instead of letting CH guess:
	// from v51 a guessed raw image may not have its first sector written,
	// which a file system at offset 0 needs. Older versions ignore it.
	ImageType string `json:"image_type,omitempty"`
}

// NetConfig is one virtio-net device on a TAP.
type NetConfig struct {
	Tap       string `json:"tap,omitempty"`
	Mac       string `json:"mac,omitempty"`
	Mtu       int    `json:"mtu,omitempty"`
	NumQueues int    `json:"num_queues,omitempty"`
	QueueSize int    `json:"queue_size,omitempty"`
	ID        string `json:"id,omitempty"`
	// The offloads default to on; boxrun turns them off (see the driver).
	OffloadTSO  *bool `json:"offload_tso,omitempty"`
	OffloadUFO  *bool `json:"offload_ufo,omitempty"`
	OffloadCsum *bool `json:"offload_csum,omitempty"`
}

// RngConfig is the virtio-rng device's host source.
type RngConfig struct {
	Src string `json:"src"`
}

// FsConfig is one virtio-fs device, served by a vhost-user backend
// (virtiofsd) listening on Socket.
type FsConfig struct {
	Tag       string `json:"tag"`
	Socket    string `json:"socket"`
	NumQueues int    `json:"num_queues"`
	QueueSize int    `json:"queue_size"`
	ID        string `json:"id,omitempty"`
}

// ConsoleConfig is the serial port or the virtio console. Mode is one of
// "Off", "Pty", "Tty", "File", "Socket" (v36+), "Null".
type ConsoleConfig struct {
	Mode   string `json:"mode"`
	File   string `json:"file,omitempty"`
	Socket string `json:"socket,omitempty"`
}

// VsockConfig is the virtio-vsock device. CH's vsock is "hybrid": the host
// side is the Unix socket at Socket (see the driver).
type VsockConfig struct {
	Cid    int64  `json:"cid"`
	Socket string `json:"socket"`
	ID     string `json:"id,omitempty"`
}

// VmState is a VM's state in VmInfo.
const (
	StateCreated  = "Created"
	StateRunning  = "Running"
	StateShutdown = "Shutdown"
	StatePaused   = "Paused"
)

// VmInfo answers GET /vm.info.
type VmInfo struct {
	Config           VmConfig `json:"config"`
	State            string   `json:"state"`
	MemoryActualSize int64    `json:"memory_actual_size,omitempty"`
}

// VmSnapshotConfig is the body of PUT /vm.snapshot.
type VmSnapshotConfig struct {
	DestinationURL string `json:"destination_url"`
}

// RestoreConfig is the body of PUT /vm.restore.
type RestoreConfig struct {
	SourceURL string `json:"source_url"`
	Prefault  bool   `json:"prefault,omitempty"`
	Resume    bool   `json:"resume,omitempty"`
	// MemoryRestoreMode is "Copy" (CH's default: all memory read at
	// restore) or "OnDemand" (pages read when the guest first touches
	// them, through userfaultfd). Releases without it ignore the field.
	MemoryRestoreMode string `json:"memory_restore_mode,omitempty"`
}
