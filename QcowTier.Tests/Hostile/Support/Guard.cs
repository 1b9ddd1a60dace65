namespace QcowTier.Tests.Hostile.Support;

/// <summary>
/// Runs an action against a hostile image on its own thread: it must finish in time (no hang) and
/// allocate little (no size field may be trusted into a huge buffer), and any failure must be a typed
/// <see cref="QcowException"/>.
/// </summary>
public static class Guard
{
    public const long MaxAllocatedBytes = 64L << 20;

    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(30);

    /// <summary>Runs <paramref name="action"/>; returns what it threw (or null), after checking time and allocation.</summary>
    public static Exception? Run(Action action) => Run(action, Timeout);

    public static Exception? Run(Action action, TimeSpan timeout)
    {
        long allocated = 0;
        Exception? thrown = null;
        var thread = new Thread(() =>
        {
            var before = GC.GetAllocatedBytesForCurrentThread();
            try
            {
                action();
            }
            catch (Exception e)
            {
                thrown = e;
            }
            finally
            {
                allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            }
        })
        {
            IsBackground = true, // a hung engine thread must not keep the test host alive
            Name = "hostile-image",
        };
        thread.Start();
        if (!thread.Join(timeout))
        {
            throw new Xunit.Sdk.XunitException($"the operation did not finish within {timeout.TotalSeconds} s (hang or runaway loop)");
        }
        allocated.Should().BeLessThan(MaxAllocatedBytes, "a hostile image must not make us allocate huge buffers");
        return thrown;
    }

    /// <summary>The action must fail with <typeparamref name="T"/> (a QcowException) whose message contains every fragment.</summary>
    public static T Fails<T>(Action action, params string[] fragments)
        where T : QcowException
    {
        var e = Run(action);
        if (e is null)
        {
            throw new Xunit.Sdk.XunitException($"expected {typeof(T).Name}, but the operation succeeded");
        }
        if (e is not T typed)
        {
            throw new Xunit.Sdk.XunitException($"expected {typeof(T).Name}, got {e.GetType().Name}: {e}");
        }
        foreach (var f in fragments)
        {
            typed.Message.Should().ContainEquivalentOf(f, "the message must name the problem");
        }
        return typed;
    }

    /// <summary>The action must succeed.</summary>
    public static void Succeeds(Action action)
    {
        var e = Run(action);
        if (e is not null)
        {
            throw new Xunit.Sdk.XunitException($"expected success, got {e.GetType().Name}: {e}");
        }
    }

    /// <summary>The action may succeed, but if it fails it must be with a typed QcowException.</summary>
    public static Exception? SucceedsOrFailsTyped(Action action)
    {
        var e = Run(action);
        if (e is not null and not QcowException)
        {
            throw new Xunit.Sdk.XunitException($"expected success or a QcowException, got {e.GetType().Name}: {e}");
        }
        return e;
    }
}
