namespace QcowTier.Cli.Disks;

/// <summary>Walks a disk's block-status runs alongside an advancing offset (compare walks two at once).</summary>
internal sealed class StatusCursor : IDisposable
{
    private readonly IEnumerator<BlockStatus> _runs;
    private BlockStatus _current;
    private bool _done;

    public StatusCursor(Disk disk, long start, long end)
    {
        _runs = disk.GetStatus(start, Math.Max(0, end - start)).GetEnumerator();
        Next();
    }

    /// <summary>The run holding <paramref name="offset"/>; offsets must not go backwards.</summary>
    public BlockStatus At(long offset)
    {
        while (!_done && _current.End <= offset)
        {
            Next();
        }
        return _done ? new BlockStatus(offset, long.MaxValue - offset, false, true, false, null) : _current;
    }

    private void Next()
    {
        if (_runs.MoveNext())
        {
            _current = _runs.Current;
        }
        else
        {
            _done = true;
        }
    }

    public void Dispose() => _runs.Dispose();
}
