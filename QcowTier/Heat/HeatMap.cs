using System.Runtime.CompilerServices;
using QcowTier.Heat;

namespace QcowTier;

/// <summary>The activity of one unit of a heat map.</summary>
/// <param name="Start">First guest byte of the unit.</param>
/// <param name="Length">Bytes in the unit (the last unit may be shorter).</param>
/// <param name="Reads">Read operations that touched the unit, decayed to <see cref="HeatMap.DecayedAt"/>.</param>
/// <param name="Writes">Write operations that touched the unit, decayed likewise.</param>
/// <param name="Score">The unit's heat: ReadWeight × reads + WriteWeight × writes.</param>
public readonly record struct HeatUnit(long Start, long Length, long Reads, long Writes, double Score)
{
    /// <summary>
    /// Operations among <see cref="Reads"/> and <see cref="Writes"/> that reached the unit more than a
    /// megabyte into a sequential stream (one request, or requests each starting where the previous one
    /// ended): an HDD serves those at its bandwidth, having paid the seek earlier in the stream.
    /// </summary>
    public long Sequential { get; init; }
}

/// <summary>
/// Per-unit read and write activity of a virtual disk (a unit is one cluster or a power-of-two number
/// of clusters), with exponential decay. Recording is lock-free and allocation-free after a region's
/// first touch; untouched regions cost nothing, touched units two bytes each.
/// </summary>
/// <remarks>
/// Counts are operations, not bytes: an I/O adds one to every unit it touches. Up to 63 a count is exact;
/// above, it is a logarithmic counter incremented with the right probability: unbiased, but a single
/// unit's count scatters by about 20 % (one standard deviation), which ranking tolerates and the
/// rebalancer's hysteresis absorbs. A third counter per unit, kept only for regions that saw any,
/// counts the operations that reached it deep into a sequential stream, so the rebalancer
/// can leave long scans on HDD. Exact operation and byte totals are kept per region of 4096 units
/// and for the whole map. Decay multiplies every count by 2^(-elapsed / half-life) when
/// <see cref="DecayTo"/> is called. Recording is thread-safe; <see cref="Merge"/>, <see cref="DecayTo"/>
/// and loading are not, and must not run while the map is recording.
/// </remarks>
public sealed class HeatMap : Engine.IIoObserver
{
    void Engine.IIoObserver.OnRead(long offset, long length) => Record(write: false, offset, length, null);

    void Engine.IIoObserver.OnWrite(long offset, long length) => Record(write: true, offset, length, null);

    internal const int PageBits = 12;
    internal const int PageUnits = 1 << PageBits;
    internal const long MaxPages = 1L << 24;

    internal sealed class Page
    {
        public readonly int[] Reads = new int[PageUnits / 4];  // four one-byte counters per int, for CAS
        public readonly int[] Writes = new int[PageUnits / 4];
        public int[]? Sequential; // allocated on the region's first sequential I/O: random workloads stay at two bytes a unit
        public long ReadOps;
        public long WriteOps;
        public long ReadBytes;
        public long WriteBytes;
    }

    private readonly Page?[] _pages;

    // Recently seen I/O streams: an I/O starting exactly where one ended continues it. A handful of
    // slots follows as many interleaved streams (a VM's readahead, a backup, a log); races between
    // threads only blur the heuristic.
    private const int StreamSlots = 16;
    private readonly long[] _streamEnds = CreateStreamTable();
    private readonly long[] _streamLengths = new long[StreamSlots];
    private int _streamNext;

    /// <summary>
    /// Bytes into a stream (one request or several continuing each other) after which its units count as
    /// sequential: about where an HDD's transfer time overtakes its seek (150 MB/s × 8 ms), so a stream's
    /// first megabyte pays for the seek and the rest rides on bandwidth.
    /// </summary>
    internal const long SequentialAfterBytes = 1 << 20;

    private long _totalReadOps;
    private long _totalWriteOps;
    private long _totalReadBytes;
    private long _totalWriteBytes;
    private long _windowStartTicks = long.MaxValue; // UTC ticks; MaxValue: nothing recorded
    private long _windowEndTicks = long.MinValue;

    [ThreadStatic]
    private static ulong t_rng;

    private static readonly long s_tickBase = Environment.TickCount64;
    private static readonly long s_clockBase = DateTimeOffset.UtcNow.UtcTicks;

    /// <summary>Creates an empty heat map for a virtual disk.</summary>
    /// <param name="virtualSize">The disk's size in bytes.</param>
    /// <param name="clusterSize">The image's cluster size (a power of two).</param>
    /// <param name="unitClusters">Clusters per unit: a power of two. Default 1.</param>
    /// <param name="halfLife">Half-life of the decay; null for 24 hours.</param>
    /// <param name="imageId">Identity of the image the map describes; a map of another image is refused.</param>
    public HeatMap(long virtualSize, int clusterSize, int unitClusters = 1, TimeSpan? halfLife = null, Guid imageId = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(virtualSize);
        if (clusterSize < 512 || !System.Numerics.BitOperations.IsPow2(clusterSize))
        {
            throw new ArgumentException($"cluster size {clusterSize} is not a power of two of at least 512", nameof(clusterSize));
        }
        if (unitClusters < 1 || !System.Numerics.BitOperations.IsPow2(unitClusters))
        {
            throw new ArgumentException($"clusters per unit {unitClusters} is not a power of two", nameof(unitClusters));
        }
        var hl = halfLife ?? TimeSpan.FromHours(24);
        if (hl <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(halfLife), "the half-life must be positive");
        }
        VirtualSize = virtualSize;
        ClusterSize = clusterSize;
        UnitBits = System.Numerics.BitOperations.Log2((uint)clusterSize) + System.Numerics.BitOperations.Log2((uint)unitClusters);
        HalfLife = hl;
        ImageId = imageId;
        var units = UnitCount;
        var pages = (units + PageUnits - 1) >> PageBits;
        if (pages > MaxPages)
        {
            throw new ArgumentException($"a {virtualSize}-byte disk has {units} units of {UnitSize} bytes: too many; use more clusters per unit", nameof(unitClusters));
        }
        _pages = new Page?[pages];
        DecayedAt = DateTimeOffset.UtcNow;
    }

    /// <summary>The disk's size in bytes.</summary>
    public long VirtualSize { get; }

    /// <summary>The image's cluster size.</summary>
    public int ClusterSize { get; }

    /// <summary>log2 of <see cref="UnitSize"/>.</summary>
    public int UnitBits { get; }

    /// <summary>Bytes per unit.</summary>
    public long UnitSize => 1L << UnitBits;

    /// <summary>Units covering the disk.</summary>
    public long UnitCount => (VirtualSize + UnitSize - 1) >> UnitBits;

    /// <summary>Half-life of the decay.</summary>
    public TimeSpan HalfLife { get; }

    /// <summary>Identity of the image the map describes (see <see cref="QcowImage.HeatIdentity"/>).</summary>
    public Guid ImageId { get; }

    /// <summary>The moment the counts are decayed to.</summary>
    public DateTimeOffset DecayedAt { get; internal set; }

    /// <summary>Weight of a read in <see cref="HeatUnit.Score"/>. Default 1.</summary>
    public double ReadWeight { get; set; } = 1;

    /// <summary>Weight of a write in <see cref="HeatUnit.Score"/>. Default 1.</summary>
    public double WriteWeight { get; set; } = 1;

    /// <summary>Start of the time window the recorded I/O covers, or null when nothing was recorded.</summary>
    public DateTimeOffset? WindowStart
    {
        get
        {
            var t = Volatile.Read(ref _windowStartTicks);
            return t == long.MaxValue ? null : new DateTimeOffset(t, TimeSpan.Zero);
        }
    }

    /// <summary>End of the time window the recorded I/O covers, or null.</summary>
    public DateTimeOffset? WindowEnd
    {
        get
        {
            var t = Volatile.Read(ref _windowEndTicks);
            return t == long.MinValue ? null : new DateTimeOffset(t, TimeSpan.Zero);
        }
    }

    /// <summary>Exact number of read operations recorded.</summary>
    public long TotalReads => Volatile.Read(ref _totalReadOps);

    /// <summary>Exact number of write operations recorded.</summary>
    public long TotalWrites => Volatile.Read(ref _totalWriteOps);

    /// <summary>Exact number of bytes read.</summary>
    public long TotalReadBytes => Volatile.Read(ref _totalReadBytes);

    /// <summary>Exact number of bytes written.</summary>
    public long TotalWriteBytes => Volatile.Read(ref _totalWriteBytes);

    /// <summary>Bytes of memory the counters use (zero for untouched regions).</summary>
    public long MemoryBytes
    {
        get
        {
            long n = (long)_pages.Length * IntPtr.Size;
            foreach (var p in _pages)
            {
                if (p is not null)
                {
                    n += 2L * PageUnits + 64 + (p.Sequential is null ? 0 : PageUnits);
                }
            }
            return n;
        }
    }

    internal Page?[] Pages => _pages;

    /// <summary>Records a read of guest bytes. Lock-free; safe from any number of threads.</summary>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes.</param>
    public void RecordRead(long offset, long length) => Record(write: false, offset, length, null);

    /// <summary>Records a write of guest bytes. Lock-free; safe from any number of threads.</summary>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes.</param>
    public void RecordWrite(long offset, long length) => Record(write: true, offset, length, null);

    /// <summary>Records one I/O, at a given time (trace import) or now.</summary>
    /// <param name="write">A write, or a read.</param>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes; 0-byte I/Os count one operation on the unit at <paramref name="offset"/>.</param>
    /// <param name="when">When it happened; null for now.</param>
    public void Record(bool write, long offset, long length, DateTimeOffset? when)
    {
        if (offset < 0 || length < 0 || offset >= VirtualSize)
        {
            return; // an I/O outside the disk heats nothing; importers count such lines themselves
        }
        length = Math.Min(length, VirtualSize - offset);
        // Live recording stamps the window with a coarse monotonic clock: DateTimeOffset.UtcNow per I/O
        // costs more than the rest of the hot path, and milliseconds are plenty for a window.
        var ticks = when?.UtcTicks ?? s_clockBase + (Environment.TickCount64 - s_tickBase) * TimeSpan.TicksPerMillisecond;
        UpdateWindow(ticks);
        var first = offset >> UnitBits;
        var last = (offset + Math.Max(length, 1) - 1) >> UnitBits;
        var streamed = StreamPosition(offset, length);
        if (write)
        {
            Interlocked.Increment(ref _totalWriteOps);
            Interlocked.Add(ref _totalWriteBytes, length);
        }
        else
        {
            Interlocked.Increment(ref _totalReadOps);
            Interlocked.Add(ref _totalReadBytes, length);
        }
        for (var u = first; u <= last; u++)
        {
            var page = GetPage(u >> PageBits);
            var unitStart = u << UnitBits;
            var bytes = Math.Min(offset + length, unitStart + UnitSize) - Math.Max(offset, unitStart);
            if (write)
            {
                Interlocked.Increment(ref page.WriteOps);
                Interlocked.Add(ref page.WriteBytes, Math.Max(bytes, 0));
                Bump(page.Writes, (int)(u & (PageUnits - 1)));
            }
            else
            {
                Interlocked.Increment(ref page.ReadOps);
                Interlocked.Add(ref page.ReadBytes, Math.Max(bytes, 0));
                Bump(page.Reads, (int)(u & (PageUnits - 1)));
            }
            if (streamed + Math.Max(0, unitStart - offset) >= SequentialAfterBytes)
            {
                Bump(page.Sequential ?? EnsureSequential(page), (int)(u & (PageUnits - 1)));
            }
        }
    }

    private static long[] CreateStreamTable()
    {
        var t = new long[StreamSlots];
        Array.Fill(t, -1);
        return t;
    }

    /// <summary>Bytes of the recent stream this I/O continues (0 when it starts a new one); the I/O joins it.</summary>
    private long StreamPosition(long offset, long length)
    {
        for (var i = 0; i < StreamSlots; i++)
        {
            if (offset > 0 && Volatile.Read(ref _streamEnds[i]) == offset)
            {
                var before = Volatile.Read(ref _streamLengths[i]);
                Volatile.Write(ref _streamLengths[i], before + length);
                Volatile.Write(ref _streamEnds[i], offset + length);
                return before;
            }
        }
        // A plain increment: a lost update only reuses a slot, and a contended atomic here would cost
        // every random I/O a shared cache line.
        var slot = ++_streamNext & (StreamSlots - 1);
        Volatile.Write(ref _streamLengths[slot], length);
        Volatile.Write(ref _streamEnds[slot], offset + length);
        return 0;
    }

    private static int[] EnsureSequential(Page page)
    {
        var fresh = new int[PageUnits / 4];
        return Interlocked.CompareExchange(ref page.Sequential, fresh, null) ?? fresh;
    }

    internal static int[] SequentialOf(Page page) => page.Sequential ?? EnsureSequential(page);

    private void UpdateWindow(long ticks)
    {
        var s = Volatile.Read(ref _windowStartTicks);
        while (ticks < s)
        {
            var seen = Interlocked.CompareExchange(ref _windowStartTicks, ticks, s);
            if (seen == s)
            {
                break;
            }
            s = seen;
        }
        var e = Volatile.Read(ref _windowEndTicks);
        while (ticks > e)
        {
            var seen = Interlocked.CompareExchange(ref _windowEndTicks, ticks, e);
            if (seen == e)
            {
                break;
            }
            e = seen;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private Page GetPage(long index)
    {
        var p = Volatile.Read(ref _pages[index]);
        if (p is not null)
        {
            return p;
        }
        var fresh = new Page();
        return Interlocked.CompareExchange(ref _pages[index], fresh, null) ?? fresh;
    }

    private static void Bump(int[] words, int unit)
    {
        var shift = (unit & 3) * 8;
        ref var word = ref words[unit >> 2];
        while (true)
        {
            var old = Volatile.Read(ref word);
            var code = (byte)(old >> shift);
            if (!HeatCounter.ShouldIncrement(code, ref t_rng))
            {
                return;
            }
            if (Interlocked.CompareExchange(ref word, old + (1 << shift), old) == old)
            {
                return;
            }
        }
    }

    internal static byte GetCode(int[] words, int unit) => (byte)(Volatile.Read(ref words[unit >> 2]) >> ((unit & 3) * 8));

    internal static void SetCode(int[] words, int unit, byte code)
    {
        var shift = (unit & 3) * 8;
        words[unit >> 2] = (words[unit >> 2] & ~(0xff << shift)) | (code << shift);
    }

    /// <summary>The activity of one unit.</summary>
    /// <param name="unit">Unit index.</param>
    /// <returns>The unit's counts and score.</returns>
    public HeatUnit GetUnit(long unit)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(unit);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(unit, UnitCount);
        var page = _pages[unit >> PageBits];
        var start = unit << UnitBits;
        var length = Math.Min(UnitSize, VirtualSize - start);
        if (page is null)
        {
            return new HeatUnit(start, length, 0, 0, 0);
        }
        var i = (int)(unit & (PageUnits - 1));
        var r = HeatCounter.Decode(GetCode(page.Reads, i));
        var w = HeatCounter.Decode(GetCode(page.Writes, i));
        var q = page.Sequential is { } seq ? HeatCounter.Decode(GetCode(seq, i)) : 0;
        return new HeatUnit(start, length, r, w, ReadWeight * r + WriteWeight * w) { Sequential = Math.Min(q, r + w) };
    }

    /// <summary>Every unit with activity, in disk order.</summary>
    /// <returns>The touched units.</returns>
    public IEnumerable<HeatUnit> TouchedUnits()
    {
        for (long p = 0; p < _pages.Length; p++)
        {
            var page = _pages[p];
            if (page is null)
            {
                continue;
            }
            for (var i = 0; i < PageUnits; i++)
            {
                var u = (p << PageBits) + i;
                if (u >= UnitCount)
                {
                    yield break;
                }
                if (GetCode(page.Reads, i) != 0 || GetCode(page.Writes, i) != 0)
                {
                    yield return GetUnit(u);
                }
            }
        }
    }

    /// <summary>The hottest units, hottest first (ties: lower offset first).</summary>
    /// <param name="count">How many; int.MaxValue for all touched units.</param>
    /// <returns>The units.</returns>
    public IReadOnlyList<HeatUnit> Hottest(int count = int.MaxValue)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        var all = TouchedUnits().ToList();
        all.Sort((a, b) => b.Score != a.Score ? b.Score.CompareTo(a.Score) : a.Start.CompareTo(b.Start));
        return count >= all.Count ? all : all.GetRange(0, count);
    }

    /// <summary>Decays every count to the given moment (no-op when it is not later than <see cref="DecayedAt"/>).</summary>
    /// <param name="now">The moment to decay to.</param>
    public void DecayTo(DateTimeOffset now)
    {
        var elapsed = now - DecayedAt;
        if (elapsed <= TimeSpan.Zero)
        {
            return;
        }
        Scale(Math.Pow(2, -elapsed.TotalSeconds / HalfLife.TotalSeconds));
        DecayedAt = now;
    }

    /// <summary>Multiplies every unit count by a factor in [0, 1] with unbiased random rounding.</summary>
    internal void Scale(double factor)
    {
        if (factor >= 1)
        {
            return;
        }
        var rng = 0x1234_5678_9abc_def0UL;
        foreach (var page in _pages)
        {
            if (page is null)
            {
                continue;
            }
            foreach (var words in (ReadOnlySpan<int[]?>)[page.Reads, page.Writes, page.Sequential])
            {
                if (words is null)
                {
                    continue;
                }
                for (var i = 0; i < PageUnits; i++)
                {
                    var c = GetCode(words, i);
                    if (c == 0)
                    {
                        continue;
                    }
                    var v = HeatCounter.Decode(c) * factor;
                    var whole = (long)v;
                    if (HeatCounter.NextRandom(ref rng) % 1_000_000 < (ulong)((v - whole) * 1_000_000))
                    {
                        whole++;
                    }
                    SetCode(words, i, HeatCounter.Encode(whole, ref rng));
                }
            }
        }
    }

    /// <summary>Adds another map of the same image and unit size into this one, decaying both to the later time first.</summary>
    /// <param name="other">The map to add; it is decayed in place.</param>
    public void Merge(HeatMap other)
    {
        ArgumentNullException.ThrowIfNull(other);
        if (other.ImageId != ImageId || other.UnitBits != UnitBits || other.VirtualSize != VirtualSize)
        {
            throw new ArgumentException($"cannot merge a heat map of image {other.ImageId} ({other.VirtualSize} bytes, {other.UnitSize}-byte units) into one of image {ImageId} ({VirtualSize} bytes, {UnitSize}-byte units)", nameof(other));
        }
        var later = other.DecayedAt > DecayedAt ? other.DecayedAt : DecayedAt;
        DecayTo(later);
        other.DecayTo(later);
        var rng = 0x0fed_cba9_8765_4321UL;
        for (long p = 0; p < _pages.Length; p++)
        {
            var src = other._pages[p];
            if (src is null)
            {
                continue;
            }
            var dst = GetPage(p);
            for (var i = 0; i < PageUnits; i++)
            {
                AddCode(dst.Reads, src.Reads, i, ref rng);
                AddCode(dst.Writes, src.Writes, i, ref rng);
                if (src.Sequential is { } seq)
                {
                    AddCode(SequentialOf(dst), seq, i, ref rng);
                }
            }
            dst.ReadOps += src.ReadOps;
            dst.WriteOps += src.WriteOps;
            dst.ReadBytes += src.ReadBytes;
            dst.WriteBytes += src.WriteBytes;
        }
        _totalReadOps += other._totalReadOps;
        _totalWriteOps += other._totalWriteOps;
        _totalReadBytes += other._totalReadBytes;
        _totalWriteBytes += other._totalWriteBytes;
        if (other.WindowStart is { } s)
        {
            UpdateWindow(s.UtcTicks);
        }
        if (other.WindowEnd is { } e)
        {
            UpdateWindow(e.UtcTicks);
        }
    }

    private static void AddCode(int[] dst, int[] src, int i, ref ulong rng)
    {
        var b = GetCode(src, i);
        if (b == 0)
        {
            return;
        }
        var a = GetCode(dst, i);
        SetCode(dst, i, HeatCounter.Encode(HeatCounter.Decode(a) + HeatCounter.Decode(b), ref rng));
    }

    internal void RestoreTotals(long readOps, long writeOps, long readBytes, long writeBytes, long windowStartTicks, long windowEndTicks)
    {
        _totalReadOps = readOps;
        _totalWriteOps = writeOps;
        _totalReadBytes = readBytes;
        _totalWriteBytes = writeBytes;
        _windowStartTicks = windowStartTicks;
        _windowEndTicks = windowEndTicks;
    }

    internal (long Start, long End) WindowTicks => (_windowStartTicks, _windowEndTicks);

    /// <summary>Writes the map to a sidecar file atomically (write a temporary file, flush, rename over).</summary>
    /// <param name="path">The heat map file.</param>
    public void Save(string path) => HeatMapFile.Save(this, path);

    /// <summary>Reads a heat map file, verifying its checksum and, when given, the image it belongs to.</summary>
    /// <param name="path">The heat map file.</param>
    /// <param name="expectedImageId">The image's <see cref="QcowImage.HeatIdentity"/>; a map of another image is refused. Null to accept any.</param>
    /// <returns>The map.</returns>
    public static HeatMap Load(string path, Guid? expectedImageId = null) => HeatMapFile.Load(path, expectedImageId);

    internal Page GetOrAddPage(long index) => GetPage(index);
}
