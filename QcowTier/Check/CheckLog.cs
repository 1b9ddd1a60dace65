namespace QcowTier.Check;

/// <summary>
/// The counters QEMU keeps in a BdrvCheckResult. A value type on purpose: QEMU's check saves and
/// restores whole results around its second comparison and after a rebuild, and so do we.
/// </summary>
internal struct CheckCounters
{
    public int Corruptions;
    public int Leaks;
    public int CheckErrors;
    public int CorruptionsFixed;
    public int LeaksFixed;

    public static CheckCounters operator +(CheckCounters a, CheckCounters b) => new()
    {
        Corruptions = a.Corruptions + b.Corruptions,
        Leaks = a.Leaks + b.Leaks,
        CheckErrors = a.CheckErrors + b.CheckErrors,
        CorruptionsFixed = a.CorruptionsFixed + b.CorruptionsFixed,
        LeaksFixed = a.LeaksFixed + b.LeaksFixed,
    };
}

/// <summary>
/// The lines qemu-img check prints on stderr. A damaged image can produce one line per cluster,
/// so only the first lines are kept; the counters stay exact regardless.
/// </summary>
internal sealed class CheckLog
{
    public const int MaxLines = 10_000;

    private readonly List<string> _lines = [];
    private long _dropped;

    public void Add(string line)
    {
        if (_lines.Count < MaxLines)
        {
            _lines.Add(line);
        }
        else
        {
            _dropped++;
        }
    }

    public IReadOnlyList<string> ToList()
    {
        if (_dropped == 0)
        {
            return _lines.ToArray();
        }
        var all = new List<string>(_lines) { $"({_dropped} more messages not kept)" };
        return all;
    }
}
