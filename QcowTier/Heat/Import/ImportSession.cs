namespace QcowTier.Heat.Import;

/// <summary>
/// Routes parsed I/Os to one private heat map per device, then merges the chosen device's map into the
/// target. Recording privately is what lets the busiest device be chosen after a single streaming pass,
/// lets decay run on the trace's own clock, and leaves the target untouched when the import fails or is
/// cancelled.
/// </summary>
internal sealed class ImportSession
{
    /// <summary>Devices whose counts are kept by name; later ones are summed under <see cref="OthersName"/>.</summary>
    public const int MaxBackends = 1024;

    /// <summary>Devices recorded into a private map at once: each can cost as much memory as the target.</summary>
    public const int MaxShadows = 8;

    public const string OthersName = "(others)";

    private const int QuoteLength = 200;
    private const int MaxQuotes = 1000;

    private sealed class Backend(string name, int order, bool accepted)
    {
        public readonly string Name = name;
        public readonly int Order = order;
        public readonly bool Accepted = accepted;
        public long Reads;
        public long Writes;
        public long RecordedReads;
        public long RecordedWrites;
        public long Outside;
        public long Clipped;
        public long FirstTicks = long.MaxValue;
        public long LastTicks = long.MinValue;
        public HeatMap? Shadow;
        public bool Untracked;

        public long Seen => Reads + Writes;
    }

    private readonly HeatMap _target;
    private readonly HeatImportOptions _options;
    private readonly HeatTraceFormat _format;
    private readonly Func<string, bool> _accepts;
    private readonly bool _filtered;
    private readonly long _traceStartTicks;
    private readonly long _decayStepTicks;
    private readonly Dictionary<string, Backend> _backends = new(StringComparer.Ordinal);
#if NET9_0_OR_GREATER
    private readonly Dictionary<string, Backend>.AlternateLookup<ReadOnlySpan<char>> _bySpan;
#endif
    private readonly List<HeatImportIssue> _quotes = [];
    private readonly List<string> _warnings = [];
    private Backend? _last;
    private Backend? _others;
    private int _shadows;

    public ImportSession(HeatMap target, HeatImportOptions options, HeatTraceFormat format, Func<string, bool> accepts, bool filtered)
    {
        _target = target;
        _options = options;
        _format = format;
        _accepts = accepts;
        _filtered = filtered;
        _traceStartTicks = (options.TraceStart ?? DateTimeOffset.UtcNow).UtcTicks;
        _decayStepTicks = Math.Max(1, target.HalfLife.Ticks / 32);
#if NET9_0_OR_GREATER
        _bySpan = _backends.GetAlternateLookup<ReadOnlySpan<char>>();
#endif
    }

    public long LinesIgnored { get; set; }
    public long MalformedLines { get; private set; }
    public long IosSeen { get; private set; }

    public void AddWarning(string warning)
    {
        if (_warnings.Count < 100 && !_warnings.Contains(warning))
        {
            _warnings.Add(warning);
        }
    }

    public void OnMalformed(long line, ReadOnlySpan<char> text, string reason)
    {
        MalformedLines++;
        if (_quotes.Count < Math.Clamp(_options.MaxQuotedLines, 0, MaxQuotes))
        {
            var cut = text.Length > QuoteLength ? text[..QuoteLength] : text;
            _quotes.Add(new HeatImportIssue(line, cut.ToString(), reason));
        }
    }

    /// <summary>Lists a device that was looked at but not imported (a bitmap other than the chosen one).</summary>
    public void AddUnimported(string name, long reads, long writes)
    {
        if (_backends.Count < MaxBackends && !_backends.ContainsKey(name))
        {
            _backends.Add(name, new Backend(name, _backends.Count, accepted: false) { Reads = reads, Writes = writes });
        }
    }

    /// <summary>Makes a device known before (or without) any I/O, so a device with none is still reported.</summary>
    public void Register(ReadOnlySpan<char> device) => Lookup(device);

    /// <summary>Counts one I/O against its device and, when the device is imported, records it.</summary>
    public void OnIo(bool write, long offset, long length, TraceTime timeKind, long ticks, ReadOnlySpan<char> device)
    {
        IosSeen++;
        var b = Lookup(device);
        if (write)
        {
            b.Writes++;
        }
        else
        {
            b.Reads++;
        }
        if (!b.Accepted)
        {
            return;
        }
        var vs = _target.VirtualSize;
        if (offset >= vs)
        {
            b.Outside++;
            return;
        }
        if (length > vs - offset)
        {
            b.Clipped++;
        }
        var when = timeKind switch
        {
            TraceTime.Absolute => ticks,
            TraceTime.Relative => Math.Min(_traceStartTicks + ticks, DateTime.MaxValue.Ticks),
            _ => _traceStartTicks,
        };
        var shadow = b.Shadow ?? CreateShadow(b, when);
        if (shadow is null)
        {
            return;
        }
        if (_options.DecayAlongTrace && when - shadow.DecayedAt.UtcTicks >= _decayStepTicks)
        {
            // In steps of 1/32 half-life: each step rescans the map, so not per I/O.
            shadow.DecayTo(new DateTimeOffset(when, TimeSpan.Zero));
        }
        shadow.Record(write, offset, length, new DateTimeOffset(when, TimeSpan.Zero));
        if (write)
        {
            b.RecordedWrites++;
        }
        else
        {
            b.RecordedReads++;
        }
        b.FirstTicks = Math.Min(b.FirstTicks, when);
        b.LastTicks = Math.Max(b.LastTicks, when);
    }

    private Backend Lookup(ReadOnlySpan<char> device)
    {
        if (_last is not null && device.SequenceEqual(_last.Name))
        {
            return _last;
        }
#if NET9_0_OR_GREATER
        if (_bySpan.TryGetValue(device, out var found))
        {
            return _last = found;
        }
        var name = device.ToString();
#else
        var name = device.ToString();
        if (_backends.TryGetValue(name, out var found))
        {
            return _last = found;
        }
#endif
        var accepted = _accepts(name);
        // A named device is always tracked (the filters admit few), however many others came first.
        if (_backends.Count < MaxBackends || (_filtered && accepted && _backends.Count < MaxBackends + MaxShadows))
        {
            var b = new Backend(name, _backends.Count, accepted);
            _backends.Add(name, b);
            return _last = b;
        }
        if (accepted)
        {
            AddWarning($"more than {MaxBackends} devices: the I/Os of the later ones are counted under \"{OthersName}\" and not imported; name the device to import it");
        }
        return _last = _others ??= new Backend(OthersName, int.MaxValue, accepted: false);
    }

    private HeatMap? CreateShadow(Backend b, long firstTicks)
    {
        if (b.Untracked)
        {
            return null;
        }
        if (_shadows >= MaxShadows)
        {
            b.Untracked = true;
            AddWarning($"more than {MaxShadows} devices match: \"{b.Name}\" and later ones were counted but not recorded; name the device to import it");
            return null;
        }
        _shadows++;
        var map = new HeatMap(_target.VirtualSize, _target.ClusterSize, (int)(_target.UnitSize / _target.ClusterSize), _target.HalfLife, _target.ImageId)
        {
            // Without decay the merge must not decay the target either, so both start at the same moment.
            DecayedAt = _options.DecayAlongTrace ? new DateTimeOffset(firstTicks, TimeSpan.Zero) : _target.DecayedAt,
        };
        b.Shadow = map;
        return map;
    }

    /// <summary>Merges the chosen device into the target and describes the import.</summary>
    public HeatImportResult Finish(long linesRead)
    {
        Backend? chosen = null;
        foreach (var b in _backends.Values)
        {
            if (!b.Accepted || b.Untracked)
            {
                continue;
            }
            if (chosen is null || b.Seen > chosen.Seen || (b.Seen == chosen.Seen && b.Order < chosen.Order))
            {
                chosen = b;
            }
        }
        foreach (var b in _backends.Values)
        {
            if (b.Untracked && (chosen is null || b.Seen > chosen.Seen))
            {
                AddWarning($"device \"{b.Name}\" had more I/Os than the imported one but could not be recorded; name it to import it");
            }
        }
        if (chosen is null && _format != HeatTraceFormat.QemuDirtyBitmap && _backends.Count > 0 && _backends.Values.All(b => !b.Accepted))
        {
            AddWarning("no device matched the filters");
        }
        if (chosen?.Shadow is { } shadow)
        {
            if (_options.DecayAlongTrace && chosen.LastTicks > shadow.DecayedAt.UtcTicks)
            {
                shadow.DecayTo(new DateTimeOffset(chosen.LastTicks, TimeSpan.Zero));
            }
            _target.Merge(shadow);
        }
        var all = _backends.Values.ToList();
        if (_others is not null)
        {
            all.Add(_others);
        }
        all.Sort((a, b) => a.Seen != b.Seen ? b.Seen.CompareTo(a.Seen) : a.Order.CompareTo(b.Order));
        var recorded = chosen is null ? 0 : chosen.RecordedReads + chosen.RecordedWrites;
        return new HeatImportResult
        {
            Format = _format,
            LinesRead = linesRead,
            IosImported = recorded,
            ReadsImported = chosen?.RecordedReads ?? 0,
            WritesImported = chosen?.RecordedWrites ?? 0,
            LinesIgnored = LinesIgnored,
            MalformedLines = MalformedLines,
            MalformedSamples = _quotes.ToArray(),
            IosOutsideDisk = chosen?.Outside ?? 0,
            IosClipped = chosen?.Clipped ?? 0,
            IosOfOtherDevices = all.Where(b => b != chosen).Sum(b => b.Seen),
            Backends = all.Select(b => new HeatTraceBackend(b.Name, b.Reads, b.Writes, b == chosen)).ToArray(),
            ImportedBackend = chosen?.Name,
            FirstIo = chosen is { RecordedReads: > 0 } or { RecordedWrites: > 0 } ? new DateTimeOffset(chosen.FirstTicks, TimeSpan.Zero) : null,
            LastIo = chosen is { RecordedReads: > 0 } or { RecordedWrites: > 0 } ? new DateTimeOffset(chosen.LastTicks, TimeSpan.Zero) : null,
            Warnings = _warnings.ToArray(),
        };
    }
}
