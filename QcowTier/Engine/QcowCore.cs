using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using QcowTier.Check;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// The qcow2 engine. Concurrency contract:
/// <list type="bullet">
/// <item>All metadata (L1, L2 cache, refcounts, in-flight allocations) is guarded by one lock that is
/// held only for lookups and metadata I/O, never across guest data I/O.</item>
/// <item>A write to an unallocated cluster registers the guest cluster as in flight, allocates, writes
/// the data outside the lock, then installs the L2 entry; other writers of that cluster wait for it,
/// readers see the old (zero) content until the entry is installed.</item>
/// <item>Freed clusters become reusable only after the L2/L1 writes dropping them are durable and every
/// data I/O that looked them up has finished, so a slow writer can never land in a reused cluster.</item>
/// </list>
/// Crash order at <see cref="Flush"/>: refcount increments, fsync, L2 tables, fsync, L1 entries, fsync,
/// decrements. A power cut anywhere leaves at worst leaked clusters.
/// </summary>
internal sealed partial class QcowCore : IDisposable
{
    private readonly object _lock = new();
    private readonly Dictionary<long, TaskCompletionSource> _inflight = [];
    private readonly SemaphoreSlim _checkGate = new(1, 1);
    private TaskCompletionSource? _quiesce; // set while a check waits for in-flight allocations: new writes wait for it
    private readonly HashSet<int> _dirtyL1 = [];
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _l2Bits;
    private readonly byte[] _zeroCluster;
    private ulong[] _l1;
    private MetadataCache _l2 = null!;
    private RefcountManager _refcounts = null!;
    private int _activeIo;
    private int _activeWrites;
    private int _unsynced; // 1 once any data was written since the last fsync
    private bool _needSyncBeforeL2;
    private bool _dirtyMarked;
    private bool _disposed;
    private readonly int _l2CacheTables;
    private readonly int _refcountCacheBlocks;

    public ImageStorage File { get; }

    public QcowHeader Header { get; }

    public bool ReadOnly { get; private set; }

    public string? Name => File.Name;

    public int ClusterSize => _clusterSize;

    public int ClusterBits => _clusterBits;

    public long Size => Volatile.Read(ref _size);

    private long _size;

    /// <summary>Optional observer of guest I/O (heat recording); called outside the lock.</summary>
    public IIoObserver? Observer { get; set; }

    private QcowCore(ImageStorage file, QcowHeader header, bool readOnly, long l2CacheBytes, long refcountCacheBytes)
    {
        File = file;
        Header = header;
        ReadOnly = readOnly;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _extendedL2 = (header.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) != 0;
        _entryShift = _extendedL2 ? 4 : 3; // extended L2 entries are 128 bits: descriptor, then subcluster bitmap
        _l2Bits = _clusterBits - _entryShift;
        _size = header.Size;
        _zeroCluster = new byte[_clusterSize];
        _l1 = LoadL1();
        // QEMU's default: enough L2 cache to cover the whole disk, at most 32 MiB.
        if (l2CacheBytes <= 0)
        {
            l2CacheBytes = Math.Min(32L << 20, Math.Max(1L << 20, (_size >> _l2Bits) + _clusterSize));
        }
        if (refcountCacheBytes <= 0)
        {
            refcountCacheBytes = Math.Max(256L << 10, l2CacheBytes / 4);
        }
        _l2CacheTables = (int)Math.Clamp(l2CacheBytes / _clusterSize, 2, 1 << 20);
        _refcountCacheBlocks = (int)Math.Clamp(refcountCacheBytes / _clusterSize, 2, 1 << 20);
        InitCaches();
    }

    private void InitCaches()
    {
        _l2 = new MetadataCache(_l2CacheTables, WriteBackL2);
        _refcounts = new RefcountManager(File, Header, _refcountCacheBlocks);
        GuardRefcounts(_refcounts);
    }

    internal RefcountManager Refcounts => _refcounts;

    internal ulong[] L1 => _l1;

    public static QcowCore Open(ImageStorage file, bool readOnly, long l2CacheBytes = 0, long refcountCacheBytes = 0, bool repairIfDirty = true,
        string? tierDataFile = null, QcowCacheMode cacheMode = QcowCacheMode.Writeback, Func<string, bool, bool, ImageStorage>? dataFileFactory = null,
        BackingContext? backing = null, string? externalDataFile = null, bool allowExternalDataAnywhere = false)
    {
        var fileLength = file.Length;
        var probe = new byte[(int)Math.Min(fileLength, 1 << QcowHeader.MaxClusterBits)];
        file.Read(0, probe);
        var header = QcowHeader.Parse(probe, fileLength, file.Name);
        CheckFeatures(header, readOnly, file.Name);
        var core = new QcowCore(file, header, readOnly, l2CacheBytes, refcountCacheBytes) { DataFileFactory = dataFileFactory };
        try
        {
            core.LoadTier(tierDataFile, cacheMode);
            core.LoadExternalData(externalDataFile, allowExternalDataAnywhere, cacheMode); // QcowCore.DataFile.cs
            core.OpenBacking(backing);
            if (!readOnly)
            {
                core.OpenWritable(repairIfDirty);
            }
        }
        catch
        {
            core._hdd?.Dispose();
            core.DisposeBacking();
            core._external?.Dispose();
            throw;
        }
        return core;
    }

    private static void CheckFeatures(QcowHeader h, bool readOnly, string? name)
    {
        var known = QcowHeader.IncompatDirty | QcowHeader.IncompatCorrupt | QcowHeader.IncompatExternalDataFile
            | QcowHeader.IncompatCompressionType | QcowHeader.IncompatExtendedL2 | KnownTierIncompat(h);
        var unknown = h.IncompatibleFeatures & ~known;
        if (unknown != 0)
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "Unsupported qcow2 feature(s): " + h.DescribeIncompatible(unknown));
        }
        if ((h.IncompatibleFeatures & QcowHeader.IncompatCorrupt) != 0 && !readOnly)
        {
            ThrowHelper.Corrupt(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "qcow2: Image is corrupt; cannot be opened read/write");
        }
        CheckCompressionType(h, name);
        if (h.CryptMethod != 0)
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetCryptMethod, "crypt_method", $"encrypted images (crypt_method {h.CryptMethod}) are not supported");
        }
        CheckExtendedL2(h, name);
        if ((h.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) != 0 && (h.IncompatibleFeatures & QcowHeader.IncompatExternalDataFile) != 0)
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "extended L2 entries (subclusters) with an external data file are not supported yet");
        }
        if (h.NbSnapshots != 0 && !readOnly && (h.IncompatibleFeatures & KnownTierIncompat(h)) != 0)
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetNbSnapshots, "nb_snapshots", $"the tiered image has {h.NbSnapshots} internal snapshot(s); snapshots of tiered images are not supported (open it read-only)");
        }
    }

    private ulong[] LoadL1()
    {
        var n = (int)Header.L1Size;
        var l1 = new ulong[n];
        if (n == 0)
        {
            return l1;
        }
        // Straight into the table (up to QEMU's 32 MiB), then to host order: no second buffer of that size.
        File.Read(Header.L1TableOffset, System.Runtime.InteropServices.MemoryMarshal.AsBytes(l1.AsSpan()));
        if (BitConverter.IsLittleEndian)
        {
            BinaryPrimitives.ReverseEndianness(l1, l1);
        }
        return l1;
    }

    private void OpenWritable(bool repairIfDirty)
    {
        if (!File.CanWrite)
        {
            throw new InvalidOperationException($"{Name ?? "image"}: the storage is not writable");
        }
        // Autoclear features we do not maintain are cleared, telling the next reader that whatever they
        // describe may no longer match the data; persistent bitmaps are maintained (QcowCore.Bitmaps.cs),
        // and so is a raw external data file (we keep it a valid raw image).
        PrepareAutoclearBits();
        if ((Header.IncompatibleFeatures & QcowHeader.IncompatDirty) != 0 && repairIfDirty)
        {
            // As QEMU: an image left dirty (lazy refcounts, or a crash) gets its refcounts rebuilt.
            var result = CheckCore(QcowRepairMode.All);
            if (result.Corruptions - result.CorruptionsFixed > 0)
            {
                ThrowHelper.Corrupt(Name, -1, "refcounts", $"the image was not closed cleanly and its repair left {result.Corruptions - result.CorruptionsFixed} corruption(s)");
            }
            ClearDirtyBit();
        }
    }

    private bool Lazy => (Header.CompatibleFeatures & QcowHeader.CompatLazyRefcounts) != 0;

    private void WriteHeaderU64(int offset, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        File.Write(offset, b);
    }

    private void MarkDirtyIfLazy()
    {
        if (Lazy && !_dirtyMarked)
        {
            Header.IncompatibleFeatures |= QcowHeader.IncompatDirty;
            WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
            File.Flush();
            _dirtyMarked = true;
        }
    }

    private void ClearDirtyBit()
    {
        if ((Header.IncompatibleFeatures & QcowHeader.IncompatDirty) != 0)
        {
            Header.IncompatibleFeatures &= ~QcowHeader.IncompatDirty;
            WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
            File.Flush();
        }
        _dirtyMarked = false;
    }

    /// <summary>QEMU's qcow2_signal_corruption: on a writable image, set the corrupt bit before failing.</summary>
    private void SignalCorruption(long offset, string field, string message)
    {
        if (!ReadOnly)
        {
            try
            {
                Header.IncompatibleFeatures |= QcowHeader.IncompatCorrupt;
                WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
                File.Flush();
            }
            catch (IOException)
            {
                // The original problem is what the caller needs to hear about.
            }
            ReadOnly = true;
            message += "; the image has been marked corrupt";
        }
        ThrowHelper.Corrupt(Name, offset, field, message);
    }

    // ---------------------------------------------------------------- L2 access (lock held)

    private byte[]? GetL2(int l1Index)
    {
        var l1e = _l1[l1Index];
        var off = (long)(l1e & ClusterLayout.L1OffsetMask);
        if (off == 0)
        {
            return null;
        }
        return LoadL2(off, l1Index);
    }

    private byte[] LoadL2(long off, int l1Index)
    {
        var data = _l2.TryGet(off);
        if (data is not null)
        {
            return data;
        }
        if ((off & (_clusterSize - 1)) != 0)
        {
            SignalCorruption(Header.L1TableOffset + l1Index * 8L, "L1 entry", $"L2 table offset 0x{off:x} unaligned (L1 index: 0x{l1Index:x})");
        }
        if (off + _clusterSize > File.Length)
        {
            SignalCorruption(Header.L1TableOffset + l1Index * 8L, "L1 entry", $"L2 table offset 0x{off:x} (L1 index: 0x{l1Index:x}) lies beyond the end of the file");
        }
        if (off < _clusterSize)
        {
            SignalCorruption(Header.L1TableOffset + l1Index * 8L, "L1 entry", $"L2 table offset 0x{off:x} (L1 index: 0x{l1Index:x}) overlaps the header");
        }
        data = new byte[_clusterSize];
        File.Read(off, data);
        _l2.Add(off, data, dirty: false);
        return data;
    }

    /// <summary>The L2 table for writing: allocated when missing, copied when shared (no COPIED flag).</summary>
    private (byte[] Table, long Offset) GetL2ForWrite(int l1Index)
    {
        var l1e = _l1[l1Index];
        var off = (long)(l1e & ClusterLayout.L1OffsetMask);
        if (off == 0)
        {
            MarkDirtyIfLazy();
            var newOff = _refcounts.Allocate(1, out _);
            var table = new byte[_clusterSize];
            _l2.Add(newOff, table, dirty: true);
            _l1[l1Index] = (ulong)newOff | ClusterLayout.Copied;
            NoteNewL2(newOff);
            _dirtyL1.Add(l1Index);
            _needSyncBeforeL2 = true;
            return (table, newOff);
        }
        var data = LoadL2(off, l1Index);
        if ((l1e & ClusterLayout.Copied) == 0)
        {
            MarkDirtyIfLazy();
            var newOff = _refcounts.Allocate(1, out _);
            var copy = (byte[])data.Clone();
            _l2.Add(newOff, copy, dirty: true);
            // The old table stays active for the overlap check until the L1 entry dropping it is on disk.
            _ = ActiveL2Tables();
            _l1[l1Index] = (ulong)newOff | ClusterLayout.Copied;
            NoteNewL2(newOff);
            _activeL2Dropped = true;
            _dirtyL1.Add(l1Index);
            _refcounts.QueueFree(off, 1);
            _needSyncBeforeL2 = true;
            return (copy, newOff);
        }
        return (data, off);
    }

    private void WriteBackL2(long offset, byte[] table)
    {
        // An L2 table may reach the disk only after the refcounts of what it points to, and the data
        // written into newly linked clusters, are durable.
        if (_refcounts.HasDirty || _hddRefcounts?.HasDirty == true || _needSyncBeforeL2)
        {
            SyncRefcounts();
        }
        CheckOverlap(offset, table.Length, Meta.ActiveL2);
        File.Write(offset, table);
    }

    private ulong Entry(byte[] table, int index) => BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(index << _entryShift));

    private void SetEntry(byte[] table, int index, ulong value) => BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(index << _entryShift), value);

    private long ValidateDataOffset(ulong entry, long l2Offset, int l2Index)
    {
        var host = (long)(entry & ClusterLayout.L2OffsetMask);
        if ((host & (_clusterSize - 1)) != 0)
        {
            SignalCorruption(l2Offset + l2Index * 8L, "L2 entry", $"Cluster allocation offset 0x{host:x} unaligned (L2 offset: 0x{l2Offset:x}, L2 index: 0x{l2Index:x})");
        }
        if (host < _clusterSize && _external is null)
        {
            SignalCorruption(l2Offset + l2Index * 8L, "L2 entry", $"data cluster offset 0x{host:x} overlaps the {(EntryTier(entry) == 1 ? "tier data file header" : "header")} (L2 offset: 0x{l2Offset:x}, L2 index: 0x{l2Index:x})");
        }
        if (EntryTier(entry) == 1 && host > _hdd!.Length - _clusterSize)
        {
            SignalCorruption(l2Offset + l2Index * 8L, "L2 entry", $"data cluster offset 0x{host:x} lies past the end of the tier data file {_hdd.Name} ({_hdd.Length} bytes; L2 offset: 0x{l2Offset:x}, L2 index: 0x{l2Index:x})");
        }
        return host;
    }

    // ---------------------------------------------------------------- mapping (lock held)

    internal readonly struct Mapping
    {
        public readonly ClusterKind Kind;
        public readonly long Host; // host offset of the first byte, when Kind is Normal/ZeroAllocated
        public readonly long Bytes;
        public readonly int Tier;  // 0: primary file (SSD), 1: HDD data file
        public readonly ulong Entry; // the L2 entry, when Kind is Compressed

        public Mapping(ClusterKind kind, long host, long bytes, int tier = 0, ulong entry = 0)
        {
            Kind = kind;
            Host = host;
            Bytes = bytes;
            Tier = tier;
            Entry = entry;
        }
    }

    /// <summary>Maps up to <paramref name="maxBytes"/> guest bytes at <paramref name="offset"/> to a run of one kind.</summary>
    private Mapping MapLocked(long offset, long maxBytes, bool stopAtInflight)
    {
        if (_extendedL2)
        {
            return MapExtendedLocked(offset, maxBytes, stopAtInflight);
        }
        var l2Entries = 1 << _l2Bits;
        var l1Index = (int)(offset >> (_clusterBits + _l2Bits));
        var l2Index = (int)((offset >> _clusterBits) & (l2Entries - 1));
        var inCluster = offset & (_clusterSize - 1);
        var tableEnd = ((long)(l1Index + 1) << (_clusterBits + _l2Bits)) - offset;
        maxBytes = Math.Min(maxBytes, tableEnd);
        if (l1Index >= _l1.Length)
        {
            return new Mapping(ClusterKind.Unallocated, 0, maxBytes);
        }
        var l2 = GetL2(l1Index);
        if (l2 is null)
        {
            return new Mapping(ClusterKind.Unallocated, 0, maxBytes);
        }
        var l2Off = (long)(_l1[l1Index] & ClusterLayout.L1OffsetMask);
        var e = Entry(l2, l2Index);
        var kind = Kind(e);
        var tier = EntryTier(e);
        long host = 0;
        if (kind is ClusterKind.Normal or ClusterKind.ZeroAllocated)
        {
            host = ValidateDataOffset(e, l2Off, l2Index);
        }
        var bytes = _clusterSize - inCluster;
        var next = l2Index + 1;
        var guestCluster = offset >> _clusterBits;
        while (bytes < maxBytes && next < l2Entries)
        {
            var ne = Entry(l2, next);
            var nk = Kind(ne);
            if (nk != kind || kind == ClusterKind.Compressed)
            {
                break;
            }
            if (kind is ClusterKind.Normal or ClusterKind.ZeroAllocated)
            {
                if ((long)(ne & ClusterLayout.L2OffsetMask) != host + (next - l2Index) * (long)_clusterSize || EntryTier(ne) != tier)
                {
                    break;
                }
                if (kind == ClusterKind.Normal && (ne & ClusterLayout.Copied) != (e & ClusterLayout.Copied))
                {
                    break;
                }
                ValidateDataOffset(ne, l2Off, next);
            }
            if (stopAtInflight && _inflight.ContainsKey(guestCluster + (next - l2Index)))
            {
                break;
            }
            bytes += _clusterSize;
            next++;
        }
        return new Mapping(kind, host + inCluster, Math.Min(bytes, maxBytes), tier, kind == ClusterKind.Compressed ? e : 0);
    }

    private void CheckRange(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset > Size - length)
        {
            ThrowHelper.OutOfRange(nameof(offset), offset, length, Size);
        }
    }

    private void CheckWritable()
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        if (ReadOnly)
        {
            ThrowHelper.ReadOnly(Name);
        }
    }

    // ---------------------------------------------------------------- reads

    public void Read(long offset, Span<byte> buffer)
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        CheckRange(offset, buffer.Length);
        Observer?.OnRead(offset, buffer.Length);
        while (!buffer.IsEmpty)
        {
            Mapping m;
            lock (_lock)
            {
                m = MapLocked(offset, buffer.Length, stopAtInflight: false);
                if (m.Kind == ClusterKind.Compressed)
                {
                    // Under the lock: a flush waiting for active I/O holds it, so a reader must not ask for it later.
                    CheckCompressedOverlapLocked(m.Entry, m.Tier, offset);
                }
                if (m.Kind is ClusterKind.Normal or ClusterKind.Compressed)
                {
                    Interlocked.Increment(ref _activeIo);
                }
            }
            var n = (int)m.Bytes;
            switch (m.Kind)
            {
                case ClusterKind.Normal:
                    try
                    {
                        DataFile(m.Tier).Read(m.Host, buffer[..n]);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                case ClusterKind.Compressed:
                    try
                    {
                        ReadCompressed(m.Entry, m.Tier, offset, buffer[..n], overlapChecked: true);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                case ClusterKind.Unallocated:
                    ReadBacking(offset, buffer[..n]);
                    break;
                default:
                    buffer[..n].Clear();
                    break;
            }
            buffer = buffer[n..];
            offset += n;
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken ct)
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        CheckRange(offset, buffer.Length);
        Observer?.OnRead(offset, buffer.Length);
        while (!buffer.IsEmpty)
        {
            ct.ThrowIfCancellationRequested();
            Mapping m;
            lock (_lock)
            {
                m = MapLocked(offset, buffer.Length, stopAtInflight: false);
                if (m.Kind == ClusterKind.Compressed)
                {
                    // Under the lock: a flush waiting for active I/O holds it, so a reader must not ask for it later.
                    CheckCompressedOverlapLocked(m.Entry, m.Tier, offset);
                }
                if (m.Kind is ClusterKind.Normal or ClusterKind.Compressed)
                {
                    Interlocked.Increment(ref _activeIo);
                }
            }
            var n = (int)m.Bytes;
            switch (m.Kind)
            {
                case ClusterKind.Normal:
                    try
                    {
                        await DataFile(m.Tier).ReadAsync(m.Host, buffer[..n], ct).ConfigureAwait(false);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                case ClusterKind.Compressed:
                    try
                    {
                        await ReadCompressedAsync(m.Entry, m.Tier, offset, buffer[..n], ct).ConfigureAwait(false);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                case ClusterKind.Unallocated:
                    await ReadBackingAsync(offset, buffer[..n], ct).ConfigureAwait(false);
                    break;
                default:
                    buffer.Span[..n].Clear();
                    break;
            }
            buffer = buffer[n..];
            offset += n;
        }
    }

    // ---------------------------------------------------------------- writes

    private enum PlanKind
    {
        Wait,
        InPlace,
        Allocate,
    }

    private struct WritePlan
    {
        public PlanKind Kind;
        public Task? WaitFor;
        public long Host;           // host offset of the first written byte (InPlace) or of the first cluster (Allocate)
        public int Bytes;           // guest bytes this step covers
        public long GuestCluster;   // first guest cluster (Allocate)
        public int Clusters;        // clusters allocated (Allocate)
        public int Head;            // offset of the data inside the first cluster (Allocate)
        public bool Fresh;          // the clusters read as zeroes already (Allocate)
        public bool Reused;         // an existing ZeroAllocated cluster is being filled (Allocate)
        public bool FromBacking;    // over unallocated clusters of an image with a backing file: copy its data around the write
        public long CowSource;      // host offset of a shared cluster whose content must be copied, or -1
        public int CowTier;         // tier of CowSource
        public ulong CowCompressed; // L2 entry of a compressed cluster partly overwritten (decompress, merge), or 0
        public int Tier;            // tier of Host
        public TaskCompletionSource? Done;
    }

    private WritePlan PlanWrite(long offset, int length)
    {
        if (_quiesce is not null)
        {
            return new WritePlan { Kind = PlanKind.Wait, WaitFor = _quiesce.Task };
        }
        var guestCluster = offset >> _clusterBits;
        if (_inflight.TryGetValue(guestCluster, out var pending))
        {
            return new WritePlan { Kind = PlanKind.Wait, WaitFor = pending.Task };
        }
        if (_extendedL2)
        {
            return PlanWriteExtended(offset, length);
        }
        var m = MapLocked(offset, length, stopAtInflight: true);
        if (m.Kind == ClusterKind.Normal && IsCopied(offset))
        {
            if (m.Tier == Ssd && _external is null)
            {
                CheckOverlap(m.Host, m.Bytes, Meta.None);
            }
            Interlocked.Increment(ref _activeIo);
            Interlocked.Increment(ref _activeWrites);
            return new WritePlan { Kind = PlanKind.InPlace, Host = m.Host, Bytes = (int)m.Bytes, Tier = m.Tier };
        }
        MarkDirtyIfLazy();
        var l1Index = (int)(offset >> (_clusterBits + _l2Bits));
        GetL2ForWrite(l1Index); // allocate or unshare the table first, so Commit cannot fail on it
        var head = (int)(offset & (_clusterSize - 1));
        var plan = new WritePlan { Kind = PlanKind.Allocate, GuestCluster = guestCluster, Head = head, CowSource = -1 };
        if (m.Kind == ClusterKind.ZeroAllocated && IsCopied(offset))
        {
            plan.Host = m.Host - head;
            plan.Clusters = 1;
            plan.Reused = true;
            plan.Tier = m.Tier;
        }
        else if (m.Kind == ClusterKind.Compressed)
        {
            // Compressed clusters are never written in place: a partial write merges into a new normal cluster.
            plan.CowCompressed = head != 0 || length < _clusterSize ? m.Entry : 0;
            plan.CowTier = m.Tier;
            plan.Clusters = 1;
            plan.Tier = ChooseTier(offset, 1);
            plan.Host = Allocator(plan.Tier).Allocate(1, out plan.Fresh);
        }
        else if (m.Kind == ClusterKind.Normal)
        {
            // Shared cluster (no COPIED flag): copy-on-write into a new one.
            plan.CowSource = m.Host - head;
            plan.CowTier = m.Tier;
            plan.Clusters = 1;
            plan.Tier = ChooseTier(offset, 1);
            plan.Host = AllocateData(plan.Tier, guestCluster, 1, out plan.Fresh);
        }
        else
        {
            // Unallocated or plain zero: m.Bytes already stops at in-flight clusters and at the table's end.
            plan.FromBacking = m.Kind == ClusterKind.Unallocated && HasBacking;
            var bytes = ClipToPins(offset, m.Bytes);
            plan.Clusters = (int)((head + bytes + _clusterSize - 1) >> _clusterBits);
            plan.Tier = ChooseTier(offset, plan.Clusters);
            if (plan.Tier == Hdd && SsdRoom(offset) is var room and > 0 && room < plan.Clusters)
            {
                // A write that would overflow the SSD budget fills what is left of it; the rest spills to HDD.
                plan.Tier = Ssd;
                plan.Clusters = (int)room;
            }
            plan.Host = AllocateData(plan.Tier, guestCluster, plan.Clusters, out plan.Fresh);
        }
        if (!plan.Reused)
        {
            CountInflight(plan.Tier, plan.Clusters);
        }
        plan.Bytes = (int)Math.Min(length, ((long)plan.Clusters << _clusterBits) - head);
        if (plan.Tier == Ssd && _external is null)
        {
            CheckOverlap(plan.Host, (long)plan.Clusters << _clusterBits, Meta.None);
        }
        plan.Done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        for (var i = 0; i < plan.Clusters; i++)
        {
            _inflight.Add(guestCluster + i, plan.Done);
        }
        return plan;
    }

    private bool IsCopied(long offset)
    {
        var l1Index = (int)(offset >> (_clusterBits + _l2Bits));
        if ((_l1[l1Index] & ClusterLayout.Copied) == 0)
        {
            return false;
        }
        var l2 = GetL2(l1Index)!;
        var e = Entry(l2, (int)((offset >> _clusterBits) & ((1 << _l2Bits) - 1)));
        return (e & ClusterLayout.Copied) != 0;
    }

    private void CommitAllocation(in WritePlan plan)
    {
        lock (_lock)
        {
            var guestOffset = plan.GuestCluster << _clusterBits;
            var l1Index = (int)(guestOffset >> (_clusterBits + _l2Bits));
            var (table, l2Off) = GetL2ForWrite(l1Index);
            var first = (int)(plan.GuestCluster & ((1 << _l2Bits) - 1));
            for (var i = 0; i < plan.Clusters; i++)
            {
                var old = Entry(table, first + i);
                var oldKind = ClusterKinds.Classify(old);
                if (!plan.Reused && oldKind is ClusterKind.Normal or ClusterKind.ZeroAllocated or ClusterKind.Compressed)
                {
                    FreeCluster(old);
                }
                SetEntry(table, first + i, (ulong)(plan.Host + ((long)i << _clusterBits)) | ClusterLayout.Copied | TierBits(plan.Tier));
                if (_extendedL2)
                {
                    SetBitmapAfterWrite(table, first + i, old, plan);
                }
            }
            _l2.MarkDirty(l2Off);
            _needSyncBeforeL2 = true;
            if (!plan.Reused)
            {
                EndInflight(plan.Tier, plan.Clusters, installed: true);
            }
            ReleaseInflight(plan);
        }
    }

    private void AbortAllocation(in WritePlan plan)
    {
        lock (_lock)
        {
            if (!plan.Reused)
            {
                FreeDataNow(plan.Tier, plan.Host, plan.Clusters);
                EndInflight(plan.Tier, plan.Clusters, installed: false);
            }
            ReleaseInflight(plan);
        }
    }

    private void ReleaseInflight(in WritePlan plan)
    {
        for (var i = 0; i < plan.Clusters; i++)
        {
            _inflight.Remove(plan.GuestCluster + i);
        }
        plan.Done!.SetResult();
    }

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        CheckWritable();
        CheckRange(offset, data.Length);
        Observer?.OnWrite(offset, data.Length);
        TrackWrite(offset, data.Length);
        while (!data.IsEmpty)
        {
            WritePlan plan;
            lock (_lock)
            {
                plan = PlanWrite(offset, data.Length);
            }
            switch (plan.Kind)
            {
                case PlanKind.Wait:
                    plan.WaitFor!.GetAwaiter().GetResult();
                    continue;
                case PlanKind.InPlace:
                    try
                    {
                        DataFile(plan.Tier).Write(plan.Host, data[..plan.Bytes]);
                        // After the write: a flush that consumed the flag earlier did not cover this write.
                        Volatile.Write(ref _unsynced, 1);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeWrites);
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                default:
                    try
                    {
                        FillAllocation(plan, data[..plan.Bytes]);
                    }
                    catch
                    {
                        AbortAllocation(plan);
                        throw;
                    }
                    CommitAllocation(plan);
                    break;
            }
            data = data[plan.Bytes..];
            offset += plan.Bytes;
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        CheckWritable();
        CheckRange(offset, data.Length);
        Observer?.OnWrite(offset, data.Length);
        TrackWrite(offset, data.Length);
        while (!data.IsEmpty)
        {
            ct.ThrowIfCancellationRequested();
            WritePlan plan;
            lock (_lock)
            {
                plan = PlanWrite(offset, data.Length);
            }
            switch (plan.Kind)
            {
                case PlanKind.Wait:
                    await plan.WaitFor!.ConfigureAwait(false);
                    continue;
                case PlanKind.InPlace:
                    try
                    {
                        await DataFile(plan.Tier).WriteAsync(plan.Host, data[..plan.Bytes], ct).ConfigureAwait(false);
                        Volatile.Write(ref _unsynced, 1);
                    }
                    finally
                    {
                        Interlocked.Decrement(ref _activeWrites);
                        Interlocked.Decrement(ref _activeIo);
                    }
                    break;
                default:
                    try
                    {
                        if (plan.CowSource >= 0 || plan.FromBacking || plan.CowCompressed != 0 || (_extendedL2 && (plan.Reused || HasBacking)) || !plan.Fresh && (plan.Head != 0 || plan.Bytes != plan.Clusters << _clusterBits))
                        {
                            // Padding or copy needed: the synchronous path does it with small writes.
                            FillAllocation(plan, data.Span[..plan.Bytes]);
                        }
                        else
                        {
                            await DataFile(plan.Tier).WriteAsync(plan.Host + plan.Head, data[..plan.Bytes], CancellationToken.None).ConfigureAwait(false);
                            if (plan.Fresh)
                            {
                                PadFreshTail(plan, plan.Bytes);
                            }
                        }
                    }
                    catch
                    {
                        AbortAllocation(plan);
                        throw;
                    }
                    CommitAllocation(plan);
                    break;
            }
            data = data[plan.Bytes..];
            offset += plan.Bytes;
        }
    }

    /// <summary>Writes the data of a new allocation and whatever the rest of its clusters must hold.</summary>
    private void FillAllocation(in WritePlan plan, ReadOnlySpan<byte> data)
    {
        var file = DataFile(plan.Tier);
        if (_extendedL2 && (plan.Reused || (HasBacking && plan.CowSource < 0 && plan.CowCompressed == 0)))
        {
            // Subclusters: only the touched ones become allocated; over a backing file a new cluster's
            // other subclusters stay unallocated and read through, so only the touched ones are filled.
            FillSubclusters(plan, data);
            return;
        }
        if (plan.CowCompressed != 0)
        {
            var merged = new byte[_clusterSize];
            ReadCompressedCluster(plan.CowCompressed, plan.CowTier, plan.GuestCluster, merged);
            data.CopyTo(merged.AsSpan(plan.Head));
            file.Write(plan.Host, merged);
            return;
        }
        if (plan.CowSource >= 0)
        {
            var buf = new byte[_clusterSize];
            DataFile(plan.CowTier).Read(plan.CowSource, buf);
            data.CopyTo(buf.AsSpan(plan.Head));
            file.Write(plan.Host, buf);
            return;
        }
        if (plan.FromBacking)
        {
            FillFromBacking(plan, data);
            return;
        }
        var total = (long)plan.Clusters << _clusterBits;
        if (plan.Fresh)
        {
            file.Write(plan.Host + plan.Head, data);
            PadFreshTail(plan, data.Length);
            return;
        }
        {
            // A reused cluster holds stale bytes: zero what the guest did not write.
            if (plan.Head > 0)
            {
                file.Write(plan.Host, _zeroCluster.AsSpan(0, plan.Head));
            }
            var tailStart = plan.Head + data.Length;
            var tail = total - tailStart;
            if (tail > 0)
            {
                // The tail lies within the last cluster, so it is smaller than a cluster.
                file.Write(plan.Host + tailStart, _zeroCluster.AsSpan(0, (int)tail));
            }
        }
        file.Write(plan.Host + plan.Head, data);
    }

    /// <summary>
    /// A fresh run reads as zeroes wherever the guest did not write, except that the file may end
    /// inside its last cluster: write that tail so the file ends on a cluster boundary, as QEMU's do.
    /// Writing zeroes (never truncating) is safe against concurrent writers further on.
    /// </summary>
    private void PadFreshTail(in WritePlan plan, int dataLength)
    {
        var runEnd = plan.Host + ((long)plan.Clusters << _clusterBits);
        var tailStart = plan.Host + plan.Head + dataLength;
        if (tailStart < runEnd)
        {
            var file = DataFile(plan.Tier);
            if (file.Length < runEnd)
            {
                file.Write(tailStart, _zeroCluster.AsSpan(0, (int)(runEnd - tailStart)));
            }
        }
    }

    // ---------------------------------------------------------------- discard and zeroes

    /// <summary>Frees whole clusters in the range; partial clusters at the ends are left alone, as QEMU does.</summary>
    public void Discard(long offset, long length)
    {
        CheckWritable();
        CheckRange(offset, length);
        TrackWrite(offset, length);
        if (_extendedL2)
        {
            DiscardExtended(offset, length);
            return;
        }
        var start = (offset + _clusterSize - 1) & ~(long)(_clusterSize - 1);
        var end = offset + length == Size ? offset + length : (offset + length) & ~(long)(_clusterSize - 1);
        if (end <= start)
        {
            return;
        }
        if (HasBacking)
        {
            DiscardOverBacking(start, end);
            return;
        }
        UpdateClusters(start, end, DiscardEntry);
        ZeroRawData(start, end);
    }

    private ulong DiscardEntry(ulong e)
    {
        var kind = Kind(e);
        switch (kind)
        {
            case ClusterKind.Normal:
            case ClusterKind.ZeroAllocated:
                FreeCluster(e);
                return Header.Version >= 3 ? ClusterLayout.Zero : 0;
            case ClusterKind.Compressed:
                FreeCluster(e);
                return Header.Version >= 3 ? ClusterLayout.Zero : 0;
            default:
                return e;
        }
    }

    /// <summary>Makes the range read as zeroes: zero flag on v3, unmapping when allowed; explicit zeroes where needed.</summary>
    public void WriteZeroes(long offset, long length, bool mayUnmap)
    {
        CheckWritable();
        CheckRange(offset, length);
        if (_extendedL2)
        {
            WriteZeroesExtended(offset, length, mayUnmap);
            return;
        }
        if (length == 0)
        {
            return;
        }
        TrackWrite(offset, length);
        var end = offset + length;
        var alignedStart = (offset + _clusterSize - 1) & ~(long)(_clusterSize - 1);
        var alignedEnd = end == Size ? (end + _clusterSize - 1) & ~(long)(_clusterSize - 1) : end & ~(long)(_clusterSize - 1);
        if (alignedEnd <= alignedStart)
        {
            ZeroPartial(offset, length);
            return;
        }
        if (offset < alignedStart)
        {
            ZeroPartial(offset, alignedStart - offset);
        }
        if (alignedEnd < end)
        {
            ZeroPartial(alignedEnd, end - alignedEnd);
        }
        if (Header.Version >= 3)
        {
            UpdateClusters(alignedStart, Math.Min(alignedEnd, RoundUp(Size)), e => ZeroEntry(e, mayUnmap), allocateTables: true);
            ZeroRawData(alignedStart, alignedEnd);
        }
        else if (HasBacking)
        {
            // v2 has no zero flag, and unallocated clusters would show the backing file: write zeroes (as QEMU does).
            WriteZeroBuffer(alignedStart, Math.Min(alignedEnd, Size) - alignedStart);
        }
        else if (mayUnmap)
        {
            UpdateClusters(alignedStart, alignedEnd, DiscardEntry);
        }
        else
        {
            // v2 has no zero flag: allocated clusters are overwritten, unallocated ones already read as zero.
            for (var pos = alignedStart; pos < Math.Min(alignedEnd, Size);)
            {
                Mapping m;
                lock (_lock)
                {
                    m = MapLocked(pos, Math.Min(alignedEnd, Size) - pos, stopAtInflight: false);
                }
                if (m.Kind is ClusterKind.Normal or ClusterKind.Compressed)
                {
                    WriteZeroBuffer(pos, m.Bytes);
                }
                pos += m.Bytes;
            }
        }
    }

    private long RoundUp(long v) => (v + _clusterSize - 1) & ~(long)(_clusterSize - 1);

    private ulong ZeroEntry(ulong e, bool mayUnmap)
    {
        var kind = Kind(e);
        switch (kind)
        {
            case ClusterKind.Normal:
            case ClusterKind.ZeroAllocated:
                if (mayUnmap)
                {
                    FreeCluster(e);
                    return ClusterLayout.Zero;
                }
                return e | ClusterLayout.Zero;
            case ClusterKind.Compressed:
                // As QEMU: a compressed cluster cannot carry the zero flag, so it is always unmapped.
                FreeCluster(e);
                return ClusterLayout.Zero;
            case ClusterKind.Unallocated:
                return ClusterLayout.Zero;
            default:
                return e;
        }
    }

    private void ZeroPartial(long offset, long length)
    {
        // The range may span two clusters (an unaligned range with no whole cluster inside): judge each run.
        while (length > 0)
        {
            Mapping m;
            lock (_lock)
            {
                m = MapLocked(offset, length, stopAtInflight: false);
            }
            if (m.Kind is not (ClusterKind.Unallocated or ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated) || m.Kind == ClusterKind.Unallocated && HasBacking)
            {
                WriteZeroBuffer(offset, m.Bytes); // what already reads as zeroes is left alone
            }
            offset += m.Bytes;
            length -= m.Bytes;
        }
    }

    private void WriteZeroBuffer(long offset, long length)
    {
        while (length > 0)
        {
            var n = (int)Math.Min(length, _clusterSize);
            Write(offset, _zeroCluster.AsSpan(0, n));
            offset += n;
            length -= n;
        }
    }

    /// <summary>Rewrites the L2 entries of whole clusters in [start, end), waiting for in-flight allocations.</summary>
    private void UpdateClusters(long start, long end, Func<ulong, ulong> update, bool allocateTables = false)
    {
        var l2Entries = 1 << _l2Bits;
        var pos = start;
        while (pos < end)
        {
            Task? wait = null;
            lock (_lock)
            {
                var l1Index = (int)(pos >> (_clusterBits + _l2Bits));
                var tableEnd = (long)(l1Index + 1) << (_clusterBits + _l2Bits);
                var stop = Math.Min(end, tableEnd);
                for (var c = pos >> _clusterBits; c < (stop >> _clusterBits) + ((stop & (_clusterSize - 1)) != 0 ? 1 : 0); c++)
                {
                    if (_inflight.TryGetValue(c, out var tcs))
                    {
                        wait = tcs.Task;
                        break;
                    }
                }
                if (wait is null)
                {
                    if (l1Index < _l1.Length && ((_l1[l1Index] & ClusterLayout.L1OffsetMask) != 0 || allocateTables))
                    {
                        MarkDirtyIfLazy();
                        var (table, l2Off) = GetL2ForWrite(l1Index);
                        var first = (int)((pos >> _clusterBits) & (l2Entries - 1));
                        var count = (int)((stop - pos + _clusterSize - 1) >> _clusterBits);
                        var changed = false;
                        for (var i = first; i < first + count; i++)
                        {
                            var old = Entry(table, i);
                            var neu = update(old);
                            if (neu != old)
                            {
                                SetEntry(table, i, neu);
                                changed = true;
                            }
                        }
                        if (changed)
                        {
                            _l2.MarkDirty(l2Off);
                        }
                    }
                    pos = stop;
                }
            }
            wait?.GetAwaiter().GetResult();
        }
    }

    // ---------------------------------------------------------------- flush

    public void Flush()
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        if (ReadOnly)
        {
            return;
        }
        lock (_lock)
        {
            FlushLocked();
        }
    }

    private void FlushLocked()
    {
        // Nothing written since the last flush: skip the fsync (and the device cache flush behind it), as QEMU does.
        var wrote = Interlocked.Exchange(ref _unsynced, 0) != 0;
        if (!wrote && !_refcounts.HasDirty && _hddRefcounts?.HasDirty != true && _dirtyL1.Count == 0 && !_l2.HasDirty
            && !_refcounts.HasPendingFrees && _hddRefcounts?.HasPendingFrees != true)
        {
            return;
        }
        SyncRefcounts();
        if (_l2.HasDirty || _dirtyL1.Count > 0)
        {
            _l2.WriteAllDirty();
            if (_dirtyL1.Count > 0)
            {
                File.Flush();
                WriteDirtyL1();
            }
            File.Flush();
        }
        if (_refcounts.HasPendingFrees || _hddRefcounts?.HasPendingFrees == true)
        {
            // Every data I/O that looked a freed cluster up must be done before it can be reused.
            var spin = new SpinWait();
            while (Volatile.Read(ref _activeIo) != 0)
            {
                spin.SpinOnce();
            }
            var freedSsd = _refcounts.ApplyPendingFrees();
            var freedHdd = _hddRefcounts?.ApplyPendingFrees();
            ForgetCompressedTails(freedSsd, freedHdd);
            // Give the space back to the file system (as QEMU does with discard=unmap): demotions
            // must shrink what the SSD holds, not just what the image counts.
            Reclaim(File, freedSsd);
            if (freedHdd is not null)
            {
                Reclaim(_hdd!, freedHdd);
            }
            _hddRefcounts?.WriteBlocks();
            _refcounts.WriteBack();
            _hddRefcounts?.WriteTable();
            File.Flush();
        }
    }

    private void Reclaim(ImageStorage file, List<long> clusters)
    {
        for (var i = 0; i < clusters.Count;)
        {
            var j = i + 1;
            while (j < clusters.Count && clusters[j] == clusters[j - 1] + 1)
            {
                j++;
            }
            var offset = clusters[i] << _clusterBits;
            var length = (long)(j - i) << _clusterBits;
            if (offset < file.Length)
            {
                file.Reclaim(offset, Math.Min(length, file.Length - offset));
            }
            i = j;
        }
    }

    /// <summary>
    /// Phase one of every ordered metadata write: refcount blocks of both files, flush (which also
    /// makes completed data writes durable), then the table entries that point at new blocks, flush.
    /// After it, an L2 table may safely point at anything allocated so far.
    /// </summary>
    private void SyncRefcounts()
    {
        _hddRefcounts?.WriteBlocks();
        _refcounts.WriteBlocks();
        _hdd?.Flush();
        _external?.Flush();
        File.Flush();
        if (_refcounts.HasDirtyTable || _hddRefcounts?.HasDirtyTable == true)
        {
            _hddRefcounts?.WriteTable();
            _refcounts.WriteBack();
            File.Flush();
        }
        _needSyncBeforeL2 = false;
    }

    private void WriteDirtyL1()
    {
        var dirty = _dirtyL1.ToArray();
        Array.Sort(dirty);
        Span<byte> b = stackalloc byte[8];
        foreach (var i in dirty)
        {
            BinaryPrimitives.WriteUInt64BigEndian(b, _l1[i]);
            CheckOverlap(Header.L1TableOffset + i * 8L, 8, Meta.ActiveL1);
            File.Write(Header.L1TableOffset + i * 8L, b);
        }
        _dirtyL1.Clear();
        if (_activeL2Dropped)
        {
            ForgetActiveL2(); // tables the L1 no longer points to stop being active L2 tables
            _activeL2Dropped = false;
        }
    }

    public ValueTask FlushAsync(CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        // Flushing is metadata work under the lock followed by fsync; run it off the caller's thread.
        return new ValueTask(Task.Run(Flush, ct));
    }

    // ---------------------------------------------------------------- resize

    public void Resize(long newSize, QcowPreallocation preallocation = QcowPreallocation.Off)
    {
        CheckWritable();
        if (newSize < 0 || newSize > QcowHeader.MaxVirtualSize)
        {
            throw new ArgumentOutOfRangeException(nameof(newSize), $"size {newSize} is out of range");
        }
        if (newSize % QcowHeader.SectorSize != 0)
        {
            // QEMU sees whole sectors only (and refuses such a truncate the same way).
            throw new ArgumentException($"The new size must be a multiple of {QcowHeader.SectorSize} (requested {newSize})", nameof(newSize));
        }
        if (newSize < Size)
        {
            if (preallocation != QcowPreallocation.Off)
            {
                throw new ArgumentException("Preallocation can only be used for growing images", nameof(preallocation));
            }
            Shrink(newSize); // QcowCore.Shrink.cs
            return;
        }
        lock (_lock)
        {
            FlushLocked();
            var oldSize = _size;
            var needed = QcowHeader.CeilDiv(newSize, (long)_clusterSize << _l2Bits);
            if (needed > _l1.Length)
            {
                GrowL1(needed);
            }
            if (preallocation != QcowPreallocation.Off)
            {
                // Before the size: a cut in between leaves linked clusters past the end, which QEMU accepts.
                PreallocateLocked(preallocation, oldSize, newSize); // QcowCore.Preallocate.cs
            }
            ResizeBitmaps(newSize);
            WriteHeaderU64(QcowHeader.OffsetSize, (ulong)newSize);
            File.Flush();
            Header.Size = newSize;
            Volatile.Write(ref _size, newSize);
            ResizeExternalData(newSize);
        }
    }

    private void GrowL1(long neededEntries)
    {
        if (neededEntries * 8 > QcowHeader.MaxL1Bytes)
        {
            throw new ArgumentOutOfRangeException(nameof(neededEntries), $"{Name ?? "image"}: the L1 table would need {neededEntries} entries, above qcow2's limit of {QcowHeader.MaxL1Bytes / 8}");
        }
        // Grow generously as QEMU does, so repeated small resizes do not move the table every time.
        var entries = Math.Max(neededEntries, Math.Min(QcowHeader.MaxL1Bytes / 8, _l1.Length * 3L / 2));
        var clusters = (int)QcowHeader.CeilDiv(entries * 8, _clusterSize);
        entries = Math.Min((long)clusters * _clusterSize / 8, QcowHeader.MaxL1Bytes / 8);
        var newOff = _refcounts.Allocate(clusters, out _);
        var newL1 = new ulong[entries];
        Array.Copy(_l1, newL1, _l1.Length);
        var raw = new byte[(long)clusters * _clusterSize];
        for (var i = 0; i < newL1.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), newL1[i]);
        }
        // Order: refcounts of the new table, the table itself, then the header pointing at it.
        _refcounts.WriteBack();
        CheckOverlap(newOff, raw.Length, Meta.None);
        File.Write(newOff, raw);
        File.Flush();
        Span<byte> hdr = stackalloc byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(hdr, (uint)entries);
        BinaryPrimitives.WriteUInt64BigEndian(hdr[4..], (ulong)newOff);
        File.Write(QcowHeader.OffsetL1Size, hdr);
        File.Flush();
        var oldOff = Header.L1TableOffset;
        var oldClusters = (int)QcowHeader.CeilDiv(_l1.Length * 8L, _clusterSize);
        Header.L1Size = (uint)entries;
        Header.L1TableOffset = newOff;
        _l1 = newL1;
        _dirtyL1.Clear();
        if (oldClusters > 0 && oldOff != 0)
        {
            _refcounts.FreeNow(oldOff, oldClusters);
        }
        _refcounts.WriteBack();
        File.Flush();
    }

    // ---------------------------------------------------------------- map, info, check

    /// <summary>The allocation of [offset, offset+length) as runs of one kind with contiguous host offsets.</summary>
    public List<(long Start, long Length, ClusterKind Kind, long Host, int Tier)> Map(long offset, long length)
    {
        CheckRange(offset, length);
        var result = new List<(long, long, ClusterKind, long, int)>();
        var end = offset + length;
        while (offset < end)
        {
            Mapping m;
            lock (_lock)
            {
                m = MapLocked(offset, end - offset, stopAtInflight: false);
            }
            // Extended L2: a subcluster may be unallocated inside an allocated cluster, which has a host offset.
            var host = m.Kind is ClusterKind.Normal or ClusterKind.ZeroAllocated || m.Kind == ClusterKind.Unallocated && _extendedL2 && m.Host > 0 ? m.Host : -1;
            if (result.Count > 0)
            {
                var (ps, pl, pk, ph, pt) = result[^1];
                if (pk == m.Kind && pt == m.Tier && (host < 0 && ph < 0 || ph >= 0 && host == ph + pl))
                {
                    result[^1] = (ps, pl + m.Bytes, pk, ph, pt);
                    offset += m.Bytes;
                    continue;
                }
            }
            result.Add((offset, m.Bytes, m.Kind, host, m.Tier));
            offset += m.Bytes;
        }
        return result;
    }

    public QcowCheckResult Check(QcowRepairMode mode)
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        if (mode != QcowRepairMode.None && ReadOnly)
        {
            ThrowHelper.ReadOnly(Name);
        }
        return CheckCore(mode);
    }

    /// <summary>
    /// Runs the checker on a quiet image: new writes wait, and the allocations already in flight (counted
    /// but not yet linked into their L2 table) land first, so they are neither reported as leaks nor freed
    /// under their writer by a leak repair.
    /// </summary>
    private QcowCheckResult CheckCore(QcowRepairMode mode) => Exclusive(() => CheckQuiet(mode)); // QcowCore.Snapshots.cs

    private QcowCheckResult CheckQuiet(QcowRepairMode mode)
    {
        lock (_lock)
        {
            if (!ReadOnly)
            {
                FlushLocked();
            }
            var result = QcowChecker.Run(File, Header, mode, _hdd);
            if (mode != QcowRepairMode.None && (result.LeaksFixed > 0 || result.CorruptionsFixed > 0))
            {
                // The checker rewrote refcounts (and maybe the tables) on disk: forget what we cached.
                RefreshHeader();
                InitCaches();
                ResetCompressedTails();
                InitHddRefcounts();
                _l1 = LoadL1();
                _dirtyL1.Clear();
                _tierClusters = null;
            }
            return result;
        }
    }

    public long AllocatedBytes => File.AllocatedBytes;

    /// <summary>Re-reads the header fields a repair may have moved (refcount table, L1 table).</summary>
    private void RefreshHeader()
    {
        var probe = new byte[(int)Math.Min(File.Length, 1 << QcowHeader.MaxClusterBits)];
        File.Read(0, probe);
        var fresh = QcowHeader.Parse(probe, File.Length, Name);
        Header.RefcountTableOffset = fresh.RefcountTableOffset;
        Header.RefcountTableClusters = fresh.RefcountTableClusters;
        Header.L1TableOffset = fresh.L1TableOffset;
        Header.L1Size = fresh.L1Size;
        Header.IncompatibleFeatures = fresh.IncompatibleFeatures;
        if (_tier is not null)
        {
            var ext = fresh.Extensions.FirstOrDefault(e => e.Type == TierExtension.Type);
            if (ext is not null)
            {
                var t = TierExtension.Parse(ext.Data, ext.Offset, Name);
                _tier.HddRefcountTableOffset = t.HddRefcountTableOffset;
                _tier.HddRefcountTableClusters = t.HddRefcountTableClusters;
            }
        }
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        try
        {
            if (!ReadOnly)
            {
                lock (_lock)
                {
                    FlushLocked();
                    StoreBitmaps();
                    if (_dirtyMarked)
                    {
                        ClearDirtyBit();
                    }
                }
            }
        }
        finally
        {
            _disposed = true;
            File.Dispose();
            _hdd?.Dispose();
            DisposeBacking();
            _external?.Dispose();
        }
    }
}

/// <summary>Sees every guest read and write before it is served (heat recording).</summary>
internal interface IIoObserver
{
    void OnRead(long offset, long length);

    void OnWrite(long offset, long length);
}
